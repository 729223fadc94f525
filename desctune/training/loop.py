"""Train: LoRA on the tokenized Parquet with a plain PyTorch loop you can read top to bottom, planned for the device.

Why not transformers' Trainer: on a 2-core CPU its per-step overhead and full-vocabulary logits cost more than the
model. This loop trains on the stored input_ids/labels (no re-tokenizing), in length-grouped batches right-padded
only to their own longest example, and computes the 49k-vocabulary head only on supervised positions (the prompt
needs no logits). Right padding under a causal mask never lets a real token see a pad, so no attention mask is
needed and SDPA takes its causal fast path. On CPUs with bf16 the frozen base is held in bf16 (LoRA weights stay
fp32 under autocast). On CUDA `plan` sizes the run to the card: a bf16 base where base, LoRA state and a
token-budget batch's activations fit the free memory (else 4-bit NF4), gradient checkpointing only when they would
not fit, and each decoder layer compiled (on an H200, TinyLlama shapes: 36.5k tokens/s against 5.8k for NF4 with
checkpointing).
Every `train.save_steps` steps a checkpoint (adapter, optimizer, scheduler, RNG, history) is written to a temporary
folder and renamed into place, so a kill at any moment leaves only complete checkpoints; a re-run of the same
configuration resumes from the newest one and replays the same batch order.
With `train.nproc_per_node` > 1 the same loop runs in each of several processes under torchrun, each on its share
of every optimizer step's examples (`desctune.training.distributed`, started by `desctune.training.launch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from desctune.config import Config, TrainConfig
from desctune.data.tokenize import IGNORE
from desctune.files import atomic_dir, atomic_path, dir_sha256, start_stage
from desctune.training.distributed import World, micro_batches_per_step, shard
from desctune.training.memory import AUTO_TOKEN_BUDGET, GIB, ModelShape, memory_plan
from desctune.training.ops import head_chunk_rows, head_cross_entropy, speed_up_lora

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
# The sections of the configuration that training reads, and that the adapter records as its own.
TRAIN_SECTIONS = ("model", "lora", "train")


COMPILE_BACKEND = "inductor"


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


# Where compiling the decoder layers starts to pay on CUDA, in tokens one process trains on. Measured on an NVIDIA
# H200 with TinyLlama-1.1B's shapes (bench/train_gpu.py): compiled 54,063 tokens/s after an 88 s warm-up, eager with
# the fused LoRA layers 36,668 tokens/s after 1.3 s: 86.7 s / (1/36,668 - 1/54,063 s per token) = 9.9M tokens.
COMPILE_MIN_TOKENS = 10_000_000


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
    m, t = cfg.model, cfg.train
    if cuda:
        if shape is None:
            raise ValueError("the CUDA plan needs the model's shape (ModelShape.from_config)")
        free = torch.cuda.mem_get_info()[0] if free_bytes is None else free_bytes
        worst = t.batch_size * m.max_seq_len
        mem = memory_plan(shape, free, name, cfg.lora.r, cfg.lora.target_modules, m.quantization,
                          t.gradient_checkpointing, worst if t.max_tokens_per_batch is None else t.max_tokens_per_batch,
                          min_tokens=m.max_seq_len)
        four_bit, ckpt = mem.base_dtype == "nf4", mem.gradient_checkpointing
        budget = None if t.max_tokens_per_batch is None else mem.max_tokens_per_batch
        short = train_tokens is not None and train_tokens < COMPILE_MIN_TOKENS
        compiled = t.compile if isinstance(t.compile, bool) else not short
        rows = head_chunk_rows(device, shape.vocab, free)
        estimate, free_gib = round(mem.estimate_bytes / GIB, 1), round(free / GIB, 1)
        why = mem.reason if budget else mem.reason.replace(f"{worst}-token batches", f"batches of {t.batch_size}")
    else:
        four_bit, ckpt = False, t.gradient_checkpointing is True
        budget = t.max_tokens_per_batch if isinstance(t.max_tokens_per_batch, int) else None
        compiled = t.compile is True
        rows, estimate, free_gib = head_chunk_rows(device, 0), None, None
        why = f"{name} base, {'with' if ckpt else 'no'} gradient checkpointing, " + (
            f"{budget}-token batches" if budget else f"batches of {t.batch_size} examples")
    masks = "device" if cuda else "numpy"
    # The fused LoRA layers have not run on a 4-bit base on a card: there, eager means PEFT's own LoRA forward.
    fused = not compiled and not four_bit
    layers = ("compiled decoder layers" if compiled else f"eager, fused LoRA ({masks} dropout masks)" if fused
              else "eager, PEFT LoRA")
    if cuda and t.compile == "auto" and not compiled:
        layers += f" (~{train_tokens / 1e6:.1f}M tokens to train: compiling pays from ~{COMPILE_MIN_TOKENS // 10**6}M)"
    why = f"{device}: {why}, {layers}"
    return Plan(
        device=device,
        dtype=name,
        base_dtype="nf4" if four_bit else name,
        autocast=dtype != torch.float32,
        load_in_4bit=four_bit,
        kbit_prepare=four_bit,
        gradient_checkpointing=ckpt,
        grad_scaler=cuda and dtype == torch.float16,
        fused_adamw=cuda,
        attn_implementation=m.attn_implementation,
        num_workers=dataloader_workers(t.num_workers, cuda),
        fast_lora=fused,
        compile=compiled,
        lora_masks=masks,
        max_tokens_per_batch=budget,
        head_chunk_rows=rows,
        memory_estimate_gib=estimate,
        free_memory_gib=free_gib,
        reason=why,
    )


def dataloader_workers(requested: int | None, cuda: bool) -> int:
    """Batches are slices of in-memory lists; a worker only pays off when compute does not need every core."""
    if requested is not None:
        return requested
    return min(4, (os.cpu_count() or 1) // 4) if cuda else 0


def load_examples(path: str | Path) -> list[tuple[list[int], list[int]]]:
    df = pd.read_parquet(path, columns=["input_ids", "labels"])
    return [(list(a), list(b)) for a, b in zip(df["input_ids"], df["labels"])]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, sort by length within windows of 64 batches, then shuffle the batches: little padding, random order.

    Deterministic in `seed`, so a resumed run replays exactly the batches the killed one would have seen."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Length-grouped like `length_grouped_batches`, but each batch takes as many examples as fit `max_tokens` padded
    tokens (count x its longest): a batch of long examples stays within memory, one of short ones fills the card.
    An example longer than the budget is a batch of its own. Deterministic in `seed`."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    typical = max(1, max_tokens * len(lengths) // max(1, sum(lengths)))
    window = typical * 64
    batches = []
    for start in range(0, len(order), window):
        batch: list[int] = []
        for i in sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True):
            if batch and (len(batch) + 1) * lengths[batch[0]] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
    rng.shuffle(batches)
    return batches


def epoch_batches(lengths: list[int], t: TrainConfig, max_tokens: int | None, seed: int) -> list[list[int]]:
    """One epoch's micro-batches: by token budget where the plan sets one, else `t.batch_size` examples each."""
    if max_tokens:
        return token_budget_batches(lengths, max_tokens, seed)
    return length_grouped_batches(lengths, t.batch_size, seed)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-pad to the batch's longest example (labels with IGNORE); also the count of real tokens."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return ids, labels, sum(len(x) for x, _ in examples)


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


def rng_state(device: str) -> dict:
    return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


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


def total_steps(n_batches: int, t: TrainConfig) -> int:
    per_epoch = math.ceil(n_batches / t.grad_accum)
    return t.max_steps or max(1, math.ceil(t.epochs * per_epoch))


def micro_batches(lengths: list[int], t: TrainConfig, steps: int, max_tokens: int | None = None) -> list[list[int]]:
    """The whole run's micro-batches in order: as many length-grouped epochs as `steps` optimizer steps need."""
    needed, out, epoch = steps * t.grad_accum, [], 0
    while len(out) < needed:
        out += epoch_batches(lengths, t, max_tokens, t.seed + epoch)
        epoch += 1
    return out[:needed]


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first. They appear only by rename when complete; leftover temporaries are removed."""
    if not ckpt_dir.is_dir():
        return []
    for leftover in ckpt_dir.glob(".checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    found = [(int(d.name.split("-")[-1]), d) for d in ckpt_dir.glob("checkpoint-*") if (d / "state.json").is_file()]
    return [d for _, d in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = checkpoints(ckpt_dir)
    return found[0] if found else None


class UnreadableCheckpoint(Exception):
    """A checkpoint that is damaged, or holds more than tensors and plain values."""


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors and states, progress) of a checkpoint. Only tensors and plain values load (`weights_only`), so a
    tampered file that would run code when unpickled is refused, not executed."""
    try:
        saved = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
        return saved, json.loads((path / "state.json").read_text())
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise UnreadableCheckpoint(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else
                                   type(exc).__name__) from None


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, state: dict, scaler=None,
                    device: str = "cpu", ranks_rng: list[dict] | None = None) -> Path:
    """Adapter, optimizer, scheduler, the CPU and CUDA RNG states (dropout masks) and an fp16 GradScaler's scale;
    under torchrun also every rank's RNG states (`ranks_rng`, in rank order)."""
    from peft import get_peft_model_state_dict

    final = ckpt_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        torch.save(
            {
                "adapter": get_peft_model_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **rng_state(device),
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                **({"ranks_rng": ranks_rng} if ranks_rng else {}),
            },
            tmp / "training.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(ckpt_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[-1]))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(saved: dict, model, optimizer, scheduler, scaler=None, world: World = World()) -> None:
    """Put a read checkpoint's adapter, optimizer, scheduler, RNG and scaler states in place. Under torchrun each
    rank takes its own RNG states where the checkpoint was written by as many ranks, else fresh ones of its own."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, saved["adapter"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    ranks = saved.get("ranks_rng") or [saved]
    if world.rank == 0 or len(ranks) == world.size:
        set_rng_state(ranks[world.rank])
    else:
        torch.manual_seed(hash((world.size, world.rank, int(saved["scheduler"]["last_epoch"]))))
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_loss(history: list[dict], path: Path, logger=log) -> str | None:
    """The loss curve as a PNG; skipped (None) where matplotlib is not installed, as on a bare GPU box."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed: no loss plot")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (response tokens)")
    ax.set_title("desctune training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return str(path)


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


def new_window() -> dict:
    """Sums over the optimizer steps since a line or a metric was last logged, and when that was."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "supervised": 0, "t0": time.perf_counter()}


def train_adapter(
    tokens: dict,
    base: dict,
    cfg: Config,
    out_dir: Path,
    logger: logging.Logger | logging.LoggerAdapter = log,
    log_params: Callable[[dict], None] = lambda params: None,
    log_metrics: Callable[[dict, int], None] = lambda metrics, step: None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    progress_seconds: float = 20.0,
    world: World = World(),
) -> dict:
    """Train (or resume) the LoRA adapter; writes out_dir/adapter (safetensors, tokenizer, desctune.json) and loss.png.

    Reads cfg's model, lora and train sections only. Progress goes to `logger`; the plan to `log_params` once and
    the loss, learning rate and throughput to `log_metrics(metrics, step)` (an MLflow run, or nothing).
    `on_checkpoint(step, path)` is called after each checkpoint is in place (tests use it to kill the process there).
    Under torchrun (`world`, see `desctune.training.distributed`) every rank calls it; ranks other than 0 return {}."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from desctune.models import compute_dtype, load_tokenizer, resolve_device
    from desctune.progress import Progress

    out_dir = start_stage(out_dir, logger) if world.main else Path(out_dir)  # only rank 0 writes there
    t = cfg.train
    device = resolve_device(cfg.model)
    dtype = compute_dtype(cfg.model, device)
    shape = None
    if device == "cuda":
        from transformers import AutoConfig

        shape = ModelShape.from_config(AutoConfig.from_pretrained(base["path"]))
    train_ex, val_ex = load_examples(tokens["train"]["path"]), load_examples(tokens["val"]["path"])
    lengths = [len(x) for x, _ in train_ex]
    p = plan(cfg, device, dtype, shape, train_tokens=planned_tokens(lengths, t, world.size))
    logger.info("training plan: %s", p.reason)
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(base["path"])
    pad_id = tokenizer.pad_token_id
    model = build_peft_model(base["path"], cfg, p)
    if world.rank:  # the same LoRA weights on every rank, but dropout masks of their own
        torch.manual_seed(t.seed + world.rank)
    trainable, total = model.get_nb_trainable_parameters()
    steps = total_steps(len(epoch_batches(lengths, t, p.max_tokens_per_batch, t.seed)), t)
    # This rank's micro-batches (in one process: all of them), per_step of them per optimizer step.
    schedule = shard(micro_batches(lengths, t, steps, p.max_tokens_per_batch), t.grad_accum, world.rank, world.size,
                     placeholder=len(train_ex))
    per_step = micro_batches_per_step(t.grad_accum, world.size)
    placeholder = [([pad_id, pad_id], [IGNORE, IGNORE])] if world.size > 1 else []  # no supervised token
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=p.fused_adamw)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, math.ceil(t.warmup_ratio * steps), steps)
    scaler = torch.amp.GradScaler(device, enabled=p.grad_scaler)
    log_params({**asdict(p), "steps": steps, "examples": len(train_ex), "trainable_params": trainable})

    ckpt_dir = out_dir / "checkpoints"
    resume, state = None, {"step": 0, "history": [], "loss_sum": 0.0, "tokens": 0, "supervised_tokens": 0,
                           "seconds": 0.0}
    found = None
    for path in checkpoints(ckpt_dir) if world.main else []:
        try:
            found = path, *read_checkpoint(path)
            break
        except UnreadableCheckpoint as exc:
            logger.warning("skipping %s, which cannot be read safely (%s): trying the checkpoint before it",
                           path.name, exc)
    found = world.from_main(found)
    if found is not None:
        resume, saved, state = found
        load_checkpoint(saved, model, optimizer, scheduler, scaler, world)
    start_step = state["step"]
    logger.info(
        "training %d steps on %s (%s, base %s): %d examples, %d trainable parameters%s", steps, device, p.dtype,
        p.base_dtype, len(train_ex), trainable,
        f"; resuming from {resume.name} (step {start_step})" if resume else "",
    )
    # Its own generator: an iterator over a loader draws a base seed, and from torch's global generator that draw
    # would shift every dropout mask of a resumed run against the uninterrupted one.
    loader = torch.utils.data.DataLoader(
        train_ex + placeholder, batch_sampler=schedule[start_step * per_step :], num_workers=p.num_workers,
        collate_fn=lambda ex: collate(ex, pad_id), generator=torch.Generator().manual_seed(t.seed),
    )

    model.train()
    loss_of = world.wrap(SupervisedLoss(model, p.head_chunk_rows))
    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=world.size > 1)  # under torchrun the progress lines, relayed, are the display
    progress = Progress(logger, "train step", steps, "step", every=progress_seconds, start=start_step)
    recent, window = new_window(), new_window()  # since the last progress line; since the last logged metrics
    accum: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    first = True
    for batch in loader:
        accum.append(batch)
        if len(accum) < per_step:
            continue
        t0 = time.perf_counter()
        # The step's supervised tokens over all ranks: each rank's share of the loss is divided by it (and DDP's
        # average turned into a sum), so the gradient is the one of the whole step in one process.
        n_sup = int(world.sum(sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, _ in accum))[0])

        def forward_backward() -> float:
            loss_total = 0.0
            for k, (ids, labels, _) in enumerate(accum):
                with world.step_sync(loss_of, last=k == len(accum) - 1):
                    with torch.autocast(device, dtype=dtype, enabled=p.autocast):
                        loss_sum, _ = loss_of(ids.to(device), labels.to(device))
                    scaler.scale(loss_sum * world.grad_scale / n_sup).backward()
                loss_total += float(loss_sum.detach())
            return loss_total

        loss_total = with_eager_fallback(forward_backward, model, device, logger) if first else forward_backward()
        loss_total, n_tokens = world.sum(loss_total, sum(n for _, _, n in accum))
        n_tokens = int(n_tokens)
        first = False
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        loss = loss_total / n_sup
        accum = []
        state["step"] += 1
        state["loss_sum"] += loss
        state["tokens"] += n_tokens
        state["supervised_tokens"] += n_sup
        state["seconds"] += time.perf_counter() - t0
        for w in (recent, window):
            for key, value in (("loss", loss), ("steps", 1), ("tokens", n_tokens), ("supervised", n_sup)):
                w[key] += value
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        step = state["step"]
        if progress.due(step):
            rate = recent["tokens"] / max(time.perf_counter() - recent["t0"], 1e-9)
            progress.update(step, f"loss {recent['loss'] / recent['steps']:.4f}, lr {lr:.2e}", f"{rate:.0f} tokens/s")
            recent = new_window()
        if step % t.logging_steps == 0 or step == 1 or step == steps:
            seconds = max(time.perf_counter() - window["t0"], 1e-9)
            row = {"step": step, "loss": window["loss"] / window["steps"], "learning_rate": lr,
                   "tokens_per_s": window["tokens"] / seconds,
                   "supervised_tokens_per_s": window["supervised"] / seconds}
            state["history"].append(row)
            log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step)
            window = new_window()
        if step % t.save_steps == 0 and step < steps:
            ranks_rng = world.gather(rng_state(device)) if world.size > 1 else None
            path = ckpt_dir / f"checkpoint-{step}"
            if world.main:
                save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, state, scaler, device, ranks_rng)
            if on_checkpoint is not None:
                on_checkpoint(step, path)
    bar.close()
    uncompile_layers(model)  # the validation pass runs without gradients: eager beats compiling a second graph

    logger.info("validation loss on %d examples ...", len(val_ex))
    val_loss = mean_loss(model, val_ex, t.batch_size, pad_id, device, p, world)
    logger.info("validation loss %.4f after %d steps", val_loss, state["step"])
    if not world.main:
        return {}
    adapter = out_dir / "adapter"
    with atomic_dir(adapter) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "base_model": {k: base[k] for k in ("name", "sha256", "source")},
            "system_prompt": cfg.model.system_prompt,
            "max_seq_len": cfg.model.max_seq_len,
            "config": {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k in TRAIN_SECTIONS},
        }
        (tmp / "desctune.json").write_text(json.dumps(meta, indent=2))
    history = state["history"]
    loss_plot = plot_loss(history, out_dir / "loss.png", logger) if history else None
    seconds = max(state["seconds"], 1e-9)
    peak = peak_memory_mb(device)
    log_metrics({"train/val_loss": val_loss, "train/peak_memory_mb": peak}, state["step"])
    return {
        "adapter_path": str(adapter),
        "adapter_sha256": dir_sha256(adapter),
        "loss_plot": loss_plot,
        "history": history,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "train_loss_mean": state["loss_sum"] / max(state["step"], 1),
        "val_loss": val_loss,
        "steps": state["step"],
        "resumed_from": str(resume) if resume else None,
        "seconds": seconds,
        "tokens_per_s": state["tokens"] / seconds,
        "supervised_tokens_per_s": state["supervised_tokens"] / seconds,
        "seconds_per_step": seconds / max(state["step"], 1),
        "device": device,
        "dtype": p.dtype,
        "plan": asdict(p),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "peak_memory_mb": peak,
    }

