"""The training plan: every device-dependent decision in one place, a pure function of the configuration, the
device, the model's shape and the free memory, so it is tested without the device.

On CUDA the plan sizes the run to the card: a bf16 base where base, LoRA state and a token-budget batch's activations
fit the free memory (else 4-bit NF4), gradient checkpointing only when they would not fit, and each decoder layer
compiled when the run is long enough for the compile's warm-up to pay. On the CPU: a bf16 base where the CPU has bf16,
eager, with the fused LoRA layers of `desctune.training.ops`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from desctune.config import Config, TrainConfig
from desctune.training.memory import AUTO_TOKEN_BUDGET, GIB, ModelShape, memory_plan
from desctune.training.ops import head_chunk_rows

# Where compiling the decoder layers starts to pay on CUDA, in tokens one process trains on: the compile's warm-up
# over the time it saves per token, with TinyLlama-1.1B's shapes on an H200 (bench/train_gpu.py).
COMPILE_MIN_TOKENS = 10_000_000


@dataclass(frozen=True)
class Plan:
    """Every device-dependent training decision in one place, so it can be tested without the device."""

    device: str
    dtype: str
    base_dtype: str
    autocast: bool
    load_in_4bit: bool
    kbit_prepare: bool
    gradient_checkpointing: bool
    grad_scaler: bool
    fused_adamw: bool
    attn_implementation: str
    num_workers: int
    fast_lora: bool
    compile: bool
    lora_masks: str
    max_tokens_per_batch: int | None
    head_chunk_rows: int
    memory_estimate_gib: float | None
    free_memory_gib: float | None
    reason: str


@dataclass(frozen=True)
class DevicePlan:
    """The part of the plan that differs between a card and the CPU."""

    four_bit: bool
    checkpointing: bool
    budget: int | None
    compiled: bool
    head_rows: int
    estimate_gib: float | None
    free_gib: float | None
    reason: str


def planned_tokens(lengths: list[int], t: TrainConfig, world_size: int = 1) -> int:
    """About how many tokens one process trains on: the epochs' worth of the training split or, with max_steps, that
    many full micro-batches (padded: an upper estimate); shared between the processes."""
    if t.max_steps:
        if t.max_tokens_per_batch is None:
            per_batch = t.batch_size * max(lengths, default=0)
        else:
            per_batch = t.max_tokens_per_batch if isinstance(t.max_tokens_per_batch, int) else AUTO_TOKEN_BUDGET
        total = t.max_steps * t.grad_accum * per_batch
    else:
        total = sum(lengths) * t.epochs
    return int(total / max(1, world_size))


def cuda_plan(cfg: Config, dtype_name: str, shape: ModelShape | None, free_bytes: int | None,
              train_tokens: int | None) -> DevicePlan:
    """Base dtype, checkpointing and token budget from `memory_plan` against the card's free memory; layers compiled
    unless the run is known to be too short for the warm-up to pay; the head chunked to the card."""
    if shape is None:
        raise ValueError("the CUDA plan needs the model's shape (ModelShape.from_config)")
    m, t = cfg.model, cfg.train
    free = torch.cuda.mem_get_info()[0] if free_bytes is None else free_bytes
    worst = t.batch_size * m.max_seq_len
    mem = memory_plan(shape, free, dtype_name, cfg.lora.r, cfg.lora.target_modules, m.quantization,
                      t.gradient_checkpointing, worst if t.max_tokens_per_batch is None else t.max_tokens_per_batch,
                      min_tokens=m.max_seq_len)
    budget = None if t.max_tokens_per_batch is None else mem.max_tokens_per_batch
    short = train_tokens is not None and train_tokens < COMPILE_MIN_TOKENS
    return DevicePlan(
        four_bit=mem.base_dtype == "nf4",
        checkpointing=mem.gradient_checkpointing,
        budget=budget,
        compiled=t.compile if isinstance(t.compile, bool) else not short,
        head_rows=head_chunk_rows("cuda", shape.vocab, free),
        estimate_gib=round(mem.estimate_bytes / GIB, 1),
        free_gib=round(free / GIB, 1),
        reason=mem.reason if budget else mem.reason.replace(f"{worst}-token batches", f"batches of {t.batch_size}"),
    )


def cpu_plan(cfg: Config, dtype_name: str) -> DevicePlan:
    """Never 4-bit; checkpointing, token budget and compiling only where the configuration asks for them."""
    t = cfg.train
    ckpt = t.gradient_checkpointing is True
    budget = t.max_tokens_per_batch if isinstance(t.max_tokens_per_batch, int) else None
    why = f"{dtype_name} base, {'with' if ckpt else 'no'} gradient checkpointing, " + (
        f"{budget}-token batches" if budget else f"batches of {t.batch_size} examples")
    return DevicePlan(four_bit=False, checkpointing=ckpt, budget=budget, compiled=t.compile is True,
                      head_rows=head_chunk_rows("cpu", 0), estimate_gib=None, free_gib=None, reason=why)


def plan(cfg: Config, device: str, dtype: torch.dtype, shape: ModelShape | None = None,
         free_bytes: int | None = None, train_tokens: int | None = None) -> Plan:
    """CUDA: base dtype (bf16/fp16 or 4-bit NF4 with k-bit preparation), gradient checkpointing and token budget
    from `memory_plan` against the card's free memory (`free_bytes`, default: what CUDA reports), each decoder layer
    compiled with dynamic shapes when the run trains on enough tokens (`train_tokens`, unknown: compiled) for the
    compile's warm-up to pay (COMPILE_MIN_TOKENS), else eager with fused LoRA layers (PEFT's on a 4-bit base), the
    head chunked to the card.
    CPU: never 4-bit, bf16 weights for the frozen base where the CPU has bf16, fp32 otherwise, eager, and LoRA layers
    whose training forward is one fused autograd function with cheap host-drawn dropout masks
    (`desctune.training.ops.speed_up_lora`). Explicit settings always win."""
    name = str(dtype).removeprefix("torch.")
    cuda = device == "cuda"
    d = cuda_plan(cfg, name, shape, free_bytes, train_tokens) if cuda else cpu_plan(cfg, name)
    masks = "device" if cuda else "numpy"
    # The fused LoRA layers have not run on a 4-bit base on a card: there, eager means PEFT's own LoRA forward.
    fused = not d.compiled and not d.four_bit
    layers = ("compiled decoder layers" if d.compiled else f"eager, fused LoRA ({masks} dropout masks)" if fused
              else "eager, PEFT LoRA")
    if cuda and cfg.train.compile == "auto" and not d.compiled:
        layers += f" (~{train_tokens / 1e6:.1f}M tokens to train: compiling pays from ~{COMPILE_MIN_TOKENS // 10**6}M)"
    return Plan(
        device=device,
        dtype=name,
        base_dtype="nf4" if d.four_bit else name,
        autocast=dtype != torch.float32,
        load_in_4bit=d.four_bit,
        kbit_prepare=d.four_bit,
        gradient_checkpointing=d.checkpointing,
        grad_scaler=cuda and dtype == torch.float16,
        fused_adamw=cuda,
        attn_implementation=cfg.model.attn_implementation,
        num_workers=dataloader_workers(cfg.train.num_workers, cuda),
        fast_lora=fused,
        compile=d.compiled,
        lora_masks=masks,
        max_tokens_per_batch=d.budget,
        head_chunk_rows=d.head_rows,
        memory_estimate_gib=d.estimate_gib,
        free_memory_gib=d.free_gib,
        reason=f"{device}: {d.reason}, {layers}",
    )


def dataloader_workers(requested: int | None, cuda: bool) -> int:
    """Batches are slices of in-memory lists; a worker only pays off when compute does not need every core."""
    if requested is not None:
        return requested
    return min(4, (os.cpu_count() or 1) // 4) if cuda else 0
