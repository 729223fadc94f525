"""Train: LoRA on the tokenized Parquet with a plain PyTorch loop you can read top to bottom, planned for the device.

Why not transformers' Trainer: on a 2-core CPU its per-step overhead and full-vocabulary logits cost more than the
model. This loop trains on the stored input_ids/labels in length-grouped batches (`desctune.training.batching`) and
computes the head only on supervised positions (`desctune.training.model`), as `desctune.training.plan` decides for
the device.

`train_adapter` reads in order: `setup` (plan, data, model, optimizer), `resume` (the newest checkpoint, if any),
`train_steps` (each optimizer step: `train_step`, then `Report.record` for the progress line and metrics, and every
`train.save_steps` steps a checkpoint, `desctune.training.checkpoint`), the validation loss, `save_adapter` and the
result. With `train.nproc_per_node` > 1 the same loop runs in each of several processes under torchrun, each on its
share of every optimizer step's examples (`desctune.training.distributed`, started by `desctune.training.launch`).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from desctune.config import Config
from desctune.data.tokenize import IGNORE
from desctune.files import dir_sha256, start_stage
from desctune.progress import Heartbeat
from desctune.training.batching import collate, epoch_batches, load_examples, micro_batches, total_steps
from desctune.training.checkpoint import load_checkpoint, newest_readable, rng_state, save_checkpoint
from desctune.training.distributed import World, micro_batches_per_step, shard
from desctune.training.memory import ModelShape
from desctune.training.model import (
    SupervisedLoss,
    build_peft_model,
    mean_loss,
    uncompile_layers,
    with_eager_fallback,
)
from desctune.training.plan import Plan, plan, planned_tokens
from desctune.training.save import plot_loss, save_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step over all ranks: its loss per supervised token, its tokens, and how long it took."""

    loss: float
    tokens: int
    supervised: int
    learning_rate: float
    seconds: float


@dataclass
class RunState:
    """What the run has done so far; a checkpoint's state.json, so a resumed run carries the totals on."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0
    tokens: int = 0
    supervised_tokens: int = 0
    seconds: float = 0.0

    def add(self, s: StepResult) -> None:
        self.step += 1
        self.loss_sum += s.loss
        self.tokens += s.tokens
        self.supervised_tokens += s.supervised
        self.seconds += s.seconds


@dataclass
class Window:
    """Tokens over the optimizer steps since a progress line or the metrics were last logged, and since when."""

    tokens: int = 0
    supervised: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, s: StepResult) -> None:
        self.tokens += s.tokens
        self.supervised += s.supervised

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


@dataclass
class Run:
    """What `setup` builds for one training run, on this rank."""

    cfg: Config
    world: World
    device: str
    dtype: torch.dtype
    plan: Plan
    tokenizer: object
    model: torch.nn.Module
    train_ex: list[tuple[list[int], list[int]]]
    val_ex: list[tuple[list[int], list[int]]]
    steps: int
    schedule: list[list[int]]  # this rank's micro-batches (in one process: all of them) ...
    per_step: int  # ... this many of them per optimizer step
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    trainable: int
    total: int


def model_shape(base_path: str, device: str) -> ModelShape | None:
    """The base's shape, which the CUDA plan sizes the card's memory by (the CPU plan needs none)."""
    if device != "cuda":
        return None
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(base_path))


def setup(tokens: dict, base: dict, cfg: Config, world: World, logger, log_params: Callable[[dict], None]) -> Run:
    """Plan the run for the device, load the examples and the model, and build this rank's batch schedule, the
    optimizer, the learning-rate schedule and the gradient scaler; the plan goes to `log_params`."""
    from transformers import get_scheduler

    from desctune.models import compute_dtype, load_tokenizer, resolve_device

    t = cfg.train
    device = resolve_device(cfg.model)
    dtype = compute_dtype(cfg.model, device)
    train_ex, val_ex = load_examples(tokens["train"]["path"]), load_examples(tokens["val"]["path"])
    lengths = [len(x) for x, _ in train_ex]
    p = plan(cfg, device, dtype, model_shape(base["path"], device),
             train_tokens=planned_tokens(lengths, t, world.size))
    logger.info("training plan: %s", p.reason)
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(base["path"])
    model = build_peft_model(base["path"], cfg, p)
    if world.rank:  # the same LoRA weights on every rank, but dropout masks of their own
        torch.manual_seed(t.seed + world.rank)
    trainable, total = model.get_nb_trainable_parameters()
    steps = total_steps(len(epoch_batches(lengths, t, p.max_tokens_per_batch, t.seed)), t)
    schedule = shard(micro_batches(lengths, t, steps, p.max_tokens_per_batch), t.grad_accum, world.rank, world.size,
                     placeholder=len(train_ex))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=p.fused_adamw)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, math.ceil(t.warmup_ratio * steps), steps)
    scaler = torch.amp.GradScaler(device, enabled=p.grad_scaler)
    log_params({**asdict(p), "steps": steps, "examples": len(train_ex), "trainable_params": trainable})
    return Run(cfg, world, device, dtype, p, tokenizer, model, train_ex, val_ex, steps, schedule,
               micro_batches_per_step(t.grad_accum, world.size), optimizer, scheduler, scaler, trainable, total)


def resume(run: Run, ckpt_dir: Path, logger) -> tuple[Path | None, RunState]:
    """Put the newest readable checkpoint's states in place (rank 0 reads it and sends it to the other ranks) and
    return it with its progress; (None, a fresh state) where there is none."""
    found = run.world.from_main(newest_readable(ckpt_dir, logger) if run.world.main else None)
    if found is None:
        return None, RunState()
    path, saved, state = found
    load_checkpoint(saved, run.model, run.optimizer, run.scheduler, run.scaler, run.world)
    return path, RunState(**state)


def loader(run: Run, start_step: int) -> torch.utils.data.DataLoader:
    """This rank's collated micro-batches from optimizer step `start_step` on.

    Its own generator: an iterator over a loader draws a base seed, and from torch's global generator that draw
    would shift every dropout mask of a resumed run against the uninterrupted one."""
    pad_id = run.tokenizer.pad_token_id
    placeholder = [([pad_id, pad_id], [IGNORE, IGNORE])] if run.world.size > 1 else []  # no supervised token
    return torch.utils.data.DataLoader(
        run.train_ex + placeholder, batch_sampler=run.schedule[start_step * run.per_step :],
        num_workers=run.plan.num_workers, collate_fn=lambda ex: collate(ex, pad_id),
        generator=torch.Generator().manual_seed(run.cfg.train.seed),
    )


def train_step(run: Run, loss_of: torch.nn.Module, accum: list, logger, first: bool) -> StepResult:
    """One optimizer step over this rank's micro-batches `accum`; the first step of a process falls back to eager
    layers where compiling them fails."""
    world, p = run.world, run.plan
    t0 = time.perf_counter()
    # The step's supervised tokens over all ranks: each rank's share of the loss is divided by it (and DDP's
    # average turned into a sum), so the gradient is the one of the whole step in one process.
    n_sup = int(world.sum(sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, _ in accum))[0])

    def forward_backward() -> float:
        loss_total = 0.0
        for k, (ids, labels, _) in enumerate(accum):
            with world.step_sync(loss_of, last=k == len(accum) - 1):
                with torch.autocast(run.device, dtype=run.dtype, enabled=p.autocast):
                    loss_sum, _ = loss_of(ids.to(run.device), labels.to(run.device))
                run.scaler.scale(loss_sum * world.grad_scale / n_sup).backward()
            loss_total += float(loss_sum.detach())
        return loss_total

    loss_total = with_eager_fallback(forward_backward, run.model, run.device, logger) if first else forward_backward()
    loss_total, n_tokens = world.sum(loss_total, sum(n for _, _, n in accum))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return StepResult(loss_total / n_sup, int(n_tokens), n_sup, lr, time.perf_counter() - t0)


class Report:
    """Where each step's figures go: the progress bar, a progress line every `progress_seconds`, and at the first,
    every `train.logging_steps`-th and the last step a row of the history and `log_metrics`.

    The progress line and `train/loss` name the same quantity: the mean loss of the last `train.logging_steps`
    optimizer steps (fewer right after a start or a resume), so at a step both report, they read the same."""

    def __init__(self, run: Run, start_step: int, logger, log_metrics: Callable[[dict, int], None],
                 progress_seconds: float):
        from collections import deque

        from tqdm.auto import tqdm

        from desctune.progress import Progress

        self.steps, self.logging_steps, self.log_metrics = run.steps, run.cfg.train.logging_steps, log_metrics
        self.bar = tqdm(total=run.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=run.world.size > 1)  # under torchrun the progress lines, relayed, are the display
        self.progress = Progress(logger, "train step", run.steps, "step", every=progress_seconds, start=start_step)
        self.recent, self.window = Window(), Window()  # since the last progress line; since the last logged metrics
        self.losses: deque[float] = deque(maxlen=self.logging_steps)  # the last `logging_steps` steps' losses

    def loss(self) -> float:
        """The mean loss of the last `train.logging_steps` steps: what `train/loss` and the progress line show."""
        return sum(self.losses) / len(self.losses)

    def record(self, state: RunState, s: StepResult) -> None:
        for w in (self.recent, self.window):
            w.add(s)
        self.losses.append(s.loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{s.loss:.3f}")
        step = state.step
        if self.progress.due(step):
            rate = self.recent.tokens / self.recent.seconds()
            self.progress.update(step, f"loss {self.loss():.4f} (mean of the last {len(self.losses)} steps), "
                                       f"lr {s.learning_rate:.2e}", f"{rate:.0f} tokens/s")
            self.recent = Window()
        if step % self.logging_steps == 0 or step == 1 or step == self.steps:
            w, seconds = self.window, self.window.seconds()
            row = {"step": step, "loss": self.loss(), "learning_rate": s.learning_rate,
                   "tokens_per_s": w.tokens / seconds, "supervised_tokens_per_s": w.supervised / seconds}
            state.history.append(row)
            self.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step)
            self.window = Window()

    def close(self) -> None:
        self.bar.close()


def checkpoint(run: Run, ckpt_dir: Path, state: RunState, on_checkpoint: Callable[[int, Path], None] | None) -> None:
    """Rank 0 writes the checkpoint of this step (with every rank's RNG states under torchrun); then
    `on_checkpoint(step, path)` on every rank."""
    ranks_rng = run.world.gather(rng_state(run.device)) if run.world.size > 1 else None
    path = ckpt_dir / f"checkpoint-{state.step}"
    if run.world.main:
        save_checkpoint(ckpt_dir, state.step, run.model, run.optimizer, run.scheduler, asdict(state), run.scaler,
                        run.device, ranks_rng)
    if on_checkpoint is not None:
        on_checkpoint(state.step, path)


def train_steps(run: Run, state: RunState, ckpt_dir: Path, logger, log_metrics: Callable[[dict, int], None],
                on_checkpoint: Callable[[int, Path], None] | None, progress_seconds: float) -> None:
    """The optimizer steps from `state.step` to the last, each reported, a checkpoint every `train.save_steps`."""
    start = state.step
    batches = loader(run, start)
    run.model.train()
    loss_of = run.world.wrap(SupervisedLoss(run.model, run.plan.head_chunk_rows))
    report = Report(run, start, logger, log_metrics, progress_seconds)
    accum: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def still() -> str:
        return f"train step {state.step + 1}/{run.steps} running"

    beat = progress_seconds if run.world.main else 0  # a step can outlast the cadence; one rank says so
    try:
        with Heartbeat(logger, still, beat, report.progress):
            for batch in batches:
                accum.append(batch)
                if len(accum) < run.per_step:
                    continue
                outcome = train_step(run, loss_of, accum, logger, first=state.step == start)
                accum = []
                state.add(outcome)
                report.record(state, outcome)
                if state.step % run.cfg.train.save_steps == 0 and state.step < run.steps:
                    checkpoint(run, ckpt_dir, state, on_checkpoint)
    finally:  # a training that fails closes its progress bar too (left open, it printed at the process's exit)
        report.close()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(run: Run, state: RunState, adapter: Path, loss_plot: str | None, val_loss: float,
           resumed: Path | None, peak: float) -> dict:
    """What the train stage returns: where the adapter is and its hash, the loss and speed figures, the plan."""
    history = state.history
    seconds = max(state.seconds, 1e-9)
    return {
        "adapter_path": str(adapter),
        "adapter_sha256": dir_sha256(adapter),
        "loss_plot": loss_plot,
        "history": history,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "train_loss_mean": state.loss_sum / max(state.step, 1),
        "val_loss": val_loss,
        "steps": state.step,
        "resumed_from": str(resumed) if resumed else None,
        "seconds": seconds,
        "tokens_per_s": state.tokens / seconds,
        "supervised_tokens_per_s": state.supervised_tokens / seconds,
        "seconds_per_step": seconds / max(state.step, 1),
        "device": run.device,
        "dtype": run.plan.dtype,
        "plan": asdict(run.plan),
        "trainable_params": int(run.trainable),
        "total_params": int(run.total),
        "peak_memory_mb": peak,
    }


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
    out_dir = start_stage(out_dir, logger) if world.main else Path(out_dir)  # only rank 0 writes there
    ckpt_dir = out_dir / "checkpoints"
    run = setup(tokens, base, cfg, world, logger, log_params)
    resumed, state = resume(run, ckpt_dir, logger)
    logger.info(
        "training %d steps on %s (%s, base %s): %d examples, %d trainable parameters%s", run.steps, run.device,
        run.plan.dtype, run.plan.base_dtype, len(run.train_ex), run.trainable,
        f"; resuming from {resumed.name} (step {state.step})" if resumed else "",
    )
    train_steps(run, state, ckpt_dir, logger, log_metrics, on_checkpoint, progress_seconds)
    uncompile_layers(run.model)  # the validation pass runs without gradients: eager beats compiling a second graph

    logger.info("validation loss on %d examples ...", len(run.val_ex))
    with Heartbeat(logger, lambda: f"validation loss on {len(run.val_ex)} examples running",
                   progress_seconds if world.main else 0):
        val_loss = mean_loss(run.model, run.val_ex, cfg.train.batch_size, run.tokenizer.pad_token_id, run.device,
                             run.plan, world)
    logger.info("validation loss %.4f after %d steps", val_loss, state.step)
    if not world.main:
        return {}
    adapter = save_adapter(run.model, run.tokenizer, base, cfg, out_dir / "adapter")
    loss_plot = plot_loss(state.history, out_dir / "loss.png", logger) if state.history else None
    peak = peak_memory_mb(run.device)
    log_metrics({"train/val_loss": val_loss}, state.step)
    return result(run, state, adapter, loss_plot, val_loss, resumed, peak)
