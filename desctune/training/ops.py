"""Training building blocks that make a LoRA step cheaper without changing what it computes.

On the CPU (bench/train.py profiles a real step) the 49k-vocabulary head with its cross-entropy, which holds every
batch's full fp32 logits, and PEFT's LoRA forward (input cast to fp32 and back by autocast, `nn.Dropout` drawing one
Mersenne-Twister number per element of seven LoRA inputs per layer, then a scale, a multiply and an add, each a pass
over the activations) cost more than the layer's matmuls. Each piece here removes one of those:

- `head_cross_entropy`: the head and the loss in row chunks, with the gradient for the hidden states computed in the
  same pass (the head is frozen), so no full logits tensor is ever kept; same loss and gradient as
  `F.cross_entropy(lm_head(h).float(), t, reduction="sum")`.
- `keep_mask`: dropout's mask with the same distribution (p rounded to 1/65536) from numpy's PCG64, seeded from
  torch's generator, so `torch.manual_seed` and a restored RNG state replay it exactly. On a GPU host-drawn masks
  starve the card, so there the mask is drawn by torch's generator on the tensor's own device (`source="device"`,
  also selectable on the CPU).
- `LoraBranch` / `speed_up_lora`: the LoRA branch as one autograd function (masked input, two matmuls, the scale and
  the residual add inside `addmm`), used by every LoRA layer while it trains; eval goes through PEFT unchanged.
- `head_chunk_rows`: the head's chunk size: 128 rows on the CPU (cache-sized), sized to the free memory on a card.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from torch import nn

CPU_HEAD_CHUNK_ROWS = 128
# A card gives the head's fp32 logits, log-probabilities and probabilities this share of its free memory.
HEAD_MEMORY_SHARE = 1 / 32
HEAD_BYTES_PER_LOGIT = 10


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunked; `weight` must not need a gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        w = weight.to(hidden.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk], targets[start : start + chunk]
                logp = torch.log_softmax((h @ w.T).float(), dim=-1)
                loss -= logp.gather(1, t[:, None]).sum()
                if grad is None:
                    continue
                probs = logp.exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start : start + chunk] = probs.to(h.dtype) @ w
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def head_chunk_rows(device: str, vocab: int, free_bytes: int | None = None) -> int:
    """Rows per head chunk: 128 on the CPU; on a card the power of two (256 to 16384) whose logits take about
    1/32 of `free_bytes`, so big cards run few large matmuls and small ones do not run out of memory."""
    if device == "cpu":
        return CPU_HEAD_CHUNK_ROWS
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info()[0] if device == "cuda" else 2**30
    rows = int(free_bytes * HEAD_MEMORY_SHARE / (vocab * HEAD_BYTES_PER_LOGIT))
    return 1 << max(8, min(14, rows.bit_length() - 1))


def head_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Summed next-token loss of the rows of `hidden` through `head`; the chunked path (`chunk_rows` rows at a time,
    None: `head_chunk_rows` for the device) when the head is frozen, its matmuls in autocast's dtype where autocast
    is on (as `head(hidden)` would run), the softmax in fp32."""
    weight = getattr(head, "weight", None)
    frozen = isinstance(head, nn.Linear) and head.bias is None and weight is not None and not weight.requires_grad
    if not frozen or hidden.shape[0] == 0:
        return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    chunk = chunk_rows or head_chunk_rows(device, weight.shape[0])
    return HeadCrossEntropy.apply(hidden.to(dtype), weight, targets, chunk)


def keep_mask(shape: torch.Size, p: float, device: torch.device, source: str = "numpy") -> torch.Tensor:
    """Dropout's keep mask (True with probability 1-p). `numpy`: p rounded to 1/65536, 16 random bits per element
    drawn on the host by numpy's PCG64, seeded from torch's CPU generator (the fastest on the CPU). `device`: drawn
    by torch's generator on `device`. Either way `torch.manual_seed` and a restored RNG state replay it."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if source == "device":
        return torch.rand(shape, device=device) >= p
    seed = int(torch.randint(0, 2**62, (1,)))
    bits = np.random.Generator(np.random.PCG64(seed)).integers(-32768, 32768, shape.numel(), dtype=np.int16)
    return torch.from_numpy(bits).to(device).view(shape) >= -32768 + round(p * 65536)


class LoraBranch(torch.autograd.Function):
    """`base_out + alpha * (where(keep, x, 0) @ A.T) @ B.T` with hand-written backward: one masked copy of x, the
    scale and the add folded into `addmm`, and only x's mask, the masked x and the rank-r activations kept.

    With alpha = scaling / (1 - p) this is PEFT's `base_out + lora_B(lora_A(dropout(x))) * scaling`."""

    @staticmethod
    def forward(ctx, base_out, x, a, b, alpha: float, keep):
        a_, b_ = a.to(x.dtype), b.to(x.dtype)
        flat = (x if keep is None else torch.where(keep, x, 0)).reshape(-1, x.shape[-1])
        u = flat @ a_.T
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), u, b_.T, alpha=alpha)
        ctx.save_for_backward(flat, u, a_, b_, keep)
        ctx.alpha, ctx.weight_dtypes = alpha, (a.dtype, b.dtype)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, u, a_, b_, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(u.dtype)
        grad_b = (g.T @ u).mul_(ctx.alpha)
        grad_u = (g @ b_).mul_(ctx.alpha)
        grad_a = grad_u.T @ flat
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = (grad_u @ a_).view(*grad_out.shape[:-1], a_.shape[1])
            if keep is not None:
                grad_x = torch.where(keep, grad_x, 0)
        return grad_out, grad_x, grad_a.to(ctx.weight_dtypes[0]), grad_b.to(ctx.weight_dtypes[1]), None, None


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Training forward of a PEFT LoRA `Linear` through `LoraBranch`; anything else (eval, merged, several or
    variant adapters, extra arguments) goes to PEFT's own forward."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    if (not self.training or self.disable_adapters or self.merged or args or kwargs or len(names) != 1
            or names[0] in self.lora_variant or self.lora_B[names[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    result = self.base_layer(x)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    source = self.desctune_masks
    if source == "auto":
        source = "numpy" if x.device.type == "cpu" else "device"
    keep = keep_mask(x.shape, p, x.device, source) if p > 0 else None
    weights = self.lora_A[name].weight, self.lora_B[name].weight
    return LoraBranch.apply(result, x.to(result.dtype), *weights, self.scaling[name] / (1.0 - p), keep)


def speed_up_lora(model: nn.Module, masks: str = "auto") -> int:
    """Route every PEFT LoRA layer on an `nn.Linear` through `fused_lora_forward` while training; returns how many.

    `masks` picks where dropout masks are drawn (`keep_mask`'s source): numpy, device, or auto (numpy for tensors on
    the CPU, the tensor's device elsewhere)."""
    if masks not in ("auto", "numpy", "device"):
        raise ValueError(f"masks must be auto, numpy or device, got {masks!r}")
    changed = 0
    for module in model.modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
            getattr(module, "base_layer", None), nn.Linear
        ):
            module.forward = types.MethodType(fused_lora_forward, module)
            module.desctune_masks = masks
            changed += 1
    return changed
