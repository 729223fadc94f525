"""The trained model: the base with LoRA on top as the plan builds it, its decoder layers compiled or not, and the
supervised loss the loop minimises.

The loss runs the 49k-vocabulary head only on the hidden states that predict a supervised token (the prompt needs no
logits). Batches are right-padded, and under a causal mask no real token sees a pad, so no attention mask is needed
and SDPA takes its causal fast path.
"""

from __future__ import annotations

from typing import Callable

import torch

from desctune.config import Config
from desctune.data.tokenize import IGNORE
from desctune.training.batching import collate, length_grouped_batches, token_budget_batches
from desctune.training.checkpoint import rng_state, set_rng_state
from desctune.training.distributed import World
from desctune.training.ops import head_cross_entropy, speed_up_lora
from desctune.training.plan import Plan

COMPILE_BACKEND = "inductor"


def build_peft_model(base_path: str, cfg: Config, p: Plan):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from desctune.models import load_model

    model = load_model(base_path, cfg.model, p.device, four_bit=p.load_in_4bit)
    if p.kbit_prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing)
    else:
        if p.device == "cpu" and p.base_dtype != "float32":
            model.to(getattr(torch, p.base_dtype))
        if p.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    lora = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    if p.fast_lora:
        speed_up_lora(model, p.lora_masks)
    if p.compile:
        compile_layers(model)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(causal_lm.model.layers)


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place with dynamic shapes (batches vary in width and length): one graph
    per layer type, compiled once, and the parameter names, so the saved adapter, stay as they are."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True, backend=COMPILE_BACKEND)
    return len(layers)


def uncompile_layers(model) -> None:
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


def is_compiled(model) -> bool:
    return any(layer._compiled_call_impl is not None for layer in decoder_layers(model))


def with_eager_fallback(step: Callable[[], tuple], model, device: str, logger) -> tuple:
    """Run `step()` (a training step; the first one is where compiled layers compile). If compilation fails, undo
    it, say so in one warning line, and run the step again eagerly from the same RNG state and zero gradients."""
    if not is_compiled(model):
        return step()
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    state = rng_state(device)
    try:
        return step()
    except (TorchDynamoException, InductorError) as exc:
        logger.warning("compiling the decoder layers failed (%s); training eagerly",
                       str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
    uncompile_layers(model)
    model.zero_grad(set_to_none=True)
    set_rng_state(state)
    return step()


def supervised_loss(model, ids: torch.Tensor, labels: torch.Tensor, head_rows: int | None = None
                    ) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised positions, and their count.

    The language-model head runs only on the hidden states that predict a supervised token, in chunks of `head_rows`
    (None: the device's default) that never hold the full logits (`desctune.training.ops.head_cross_entropy`)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    loss = head_cross_entropy(hidden[:, :-1][keep], causal_lm.lm_head, targets[keep], head_rows)
    return loss, int(keep.sum())


class SupervisedLoss(torch.nn.Module):
    """`supervised_loss` as a module, so that DistributedDataParallel can wrap it (one process calls it as it is)."""

    def __init__(self, model, head_rows: int | None = None):
        super().__init__()
        self.model, self.head_rows = model, head_rows

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        return supervised_loss(self.model, ids, labels, self.head_rows)


@torch.no_grad()
def mean_loss(model, examples, batch_size: int, pad_id: int, device: str, p: Plan, world: World = World()) -> float:
    """Mean supervised-token loss; under torchrun each rank takes every size-th batch and the sums are added."""
    model.eval()
    total, count = 0.0, 0
    lengths = [len(x) for x, _ in examples]
    batches = (token_budget_batches(lengths, p.max_tokens_per_batch, seed=0) if p.max_tokens_per_batch
               else length_grouped_batches(lengths, batch_size, seed=0))
    for batch in batches[world.rank :: world.size]:
        ids, labels, _ = collate([examples[i] for i in batch], pad_id)
        with torch.autocast(device, dtype=getattr(torch, p.dtype), enabled=p.autocast):
            loss, n = supervised_loss(model, ids.to(device), labels.to(device), p.head_chunk_rows)
        total, count = total + float(loss), count + n
    model.train()
    total, count = world.sum(total, count)
    return total / max(count, 1)
