"""Training building blocks that make a LoRA step cheaper without changing what it computes.

Measured on the 2-core CPU (bench/train.py, profile of a real step): the 49k-vocabulary head and its cross-entropy
materialised ~300 MB of fp32 logits per batch, PEFT cast every LoRA input from bf16 to fp32 (and autocast cast it
straight back), and `nn.Dropout` drew one Mersenne-Twister number per element of seven LoRA inputs per layer, which
cost more than the layer's matmuls. Each piece here removes one of those:

- `head_cross_entropy`: the head and the loss in row chunks, with the gradient for the hidden states computed in the
  same pass (the head is frozen), so no full logits tensor is ever kept; same loss and gradient as
  `F.cross_entropy(lm_head(h).float(), t, reduction="sum")`.
- `BitsDropout`: dropout with the same distribution (p rounded to 1/65536) whose mask comes from numpy's PCG64,
  seeded from torch's generator, so `torch.manual_seed` and a restored RNG state replay it exactly.
- `speed_up_lora`: swaps LoRA's dropouts for `BitsDropout` and turns off PEFT's input up-cast, which autocast undoes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HEAD_CHUNK_ROWS = {"cpu": 128, "cuda": 2048}


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


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of the rows of `hidden` through `head`; the chunked path when the head is frozen."""
    weight = getattr(head, "weight", None)
    frozen = isinstance(head, nn.Linear) and head.bias is None and weight is not None and not weight.requires_grad
    if not frozen or hidden.shape[0] == 0:
        return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    chunk = HEAD_CHUNK_ROWS.get(hidden.device.type, 1024)
    return HeadCrossEntropy.apply(hidden, weight, targets, chunk)


class BitsDropout(nn.Module):
    """`nn.Dropout(p)` with a mask from 16 random bits per element, drawn by numpy's PCG64 (far cheaper on CPU)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = -32768 + round(p * 65536)
        self.scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == -32768:
            return x
        seed = int(torch.randint(0, 2**62, (1,)))
        bits = np.random.Generator(np.random.PCG64(seed)).integers(-32768, 32768, x.numel(), dtype=np.int16)
        keep = torch.from_numpy(bits).to(x.device).view(x.shape) >= self.threshold
        return torch.where(keep, x * self.scale, 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def speed_up_lora(model: nn.Module) -> int:
    """Swap every LoRA dropout for `BitsDropout` and stop PEFT up-casting LoRA inputs (autocast casts them back);
    returns how many LoRA layers were changed. For CPU training under bf16 autocast."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, nn.Dropout):
                dropouts[name] = BitsDropout(dropout.p).train(dropout.training)
        module.cast_input_dtype_enabled = False
        changed += 1
    return changed
