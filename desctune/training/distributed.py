"""Data-parallel training under torchrun: what `train_adapter` asks of the other processes.

`World` is the one object the training loop talks to: in one process (the default) every call is the identity, so
that path is unchanged; under torchrun (`python -m desctune.training.rank JOB.json`, started by
`desctune.training.launch`) each rank holds the same model, trains on its own share of every optimizer step's
examples (`shard`), and DistributedDataParallel sums the LoRA gradients across ranks. The loss of a step is divided
by the step's supervised-token count over all ranks, so the summed gradient is the one a single process computes on
the whole step; only rank 0 logs, writes checkpoints and the adapter, and reads the checkpoint to resume from (sent
to the other ranks, so other machines need no shared folder).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: the rank's GPU under NCCL

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """Join the process group torchrun's environment describes: NCCL with one GPU per local rank on CUDA, gloo
        on the CPU."""
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, "cuda" if cuda else "cpu")

    def sum(self, *values: float) -> tuple:
        """Each value summed over the ranks (one all-reduce); the values themselves in one process."""
        if self.size == 1:
            return values
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (pickled)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def from_main(self, value):
        """Rank 0's `value` on every rank (pickled)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` for training: as it is in one process; else rank 0's trainable weights copied to every rank and
        the module wrapped in DistributedDataParallel, whose backward all-reduces the gradients (the frozen base is
        built the same from the same files on every rank, so it is not sent)."""
        if self.size == 1:
            return module
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        return DistributedDataParallel(module, device_ids=[self.local_rank] if self.device == "cuda" else None,
                                       init_sync=False)

    def step_sync(self, module: torch.nn.Module, last: bool):
        """Within one optimizer step's micro-batches: gradients are all-reduced on the last one only."""
        if self.size == 1 or last:
            return contextlib.nullcontext()
        return module.no_sync()

    @property
    def grad_scale(self) -> int:
        """DDP averages gradients over ranks; multiplying each rank's loss by the rank count makes that a sum."""
        return self.size


def shard(schedule: list[list[int]], grad_accum: int, rank: int, size: int, placeholder: int) -> list[list[int]]:
    """This rank's micro-batches of a run's `schedule` (grad_accum consecutive micro-batches per optimizer step).

    When grad_accum is a multiple of `size`, each step's micro-batches are dealt out whole (rank r takes r, r+size,
    ...), so each rank runs full micro-batches; otherwise each micro-batch's examples are (rank r takes every
    size-th, from the r-th: micro-batches are length-sorted, so shares are alike). Either way the ranks' examples
    of a step are disjoint and together exactly the step's. An empty share becomes [placeholder], an example
    with no supervised token: its backward gives zero gradients but still joins the all-reduce."""
    out = []
    for start in range(0, len(schedule), grad_accum):
        group = schedule[start : start + grad_accum]
        if grad_accum % size == 0:
            out += group[rank::size]
        else:
            out += [batch[rank::size] or [placeholder] for batch in group]
    return out


def micro_batches_per_step(grad_accum: int, size: int) -> int:
    return grad_accum // size if grad_accum % size == 0 else grad_accum


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux), so no rank outlives torchrun's
    agent and no agent outlives the task that started it; exit now if the parent is already gone."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:
        os._exit(1)
