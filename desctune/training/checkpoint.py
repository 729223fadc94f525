"""Checkpoints: every `train.save_steps` steps the adapter, optimizer, scheduler, RNG states and progress go to a
temporary folder that is renamed into place, so a kill at any moment leaves only complete checkpoints; a re-run of
the same configuration resumes from the newest one that reads back safely."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import torch

from desctune.files import atomic_dir
from desctune.training.distributed import World

KEEP_CHECKPOINTS = 2


class UnreadableCheckpoint(Exception):
    """A checkpoint that is damaged, or holds more than tensors and plain values."""


def rng_state(device: str) -> dict:
    return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


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


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors and states, progress) of a checkpoint. Only tensors and plain values load (`weights_only`), so a
    tampered file that would run code when unpickled is refused, not executed."""
    try:
        saved = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
        return saved, json.loads((path / "state.json").read_text())
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise UnreadableCheckpoint(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else
                                   type(exc).__name__) from None


def newest_readable(ckpt_dir: Path, logger: logging.Logger | logging.LoggerAdapter) -> tuple[Path, dict, dict] | None:
    """(path, tensors and states, progress) of the newest checkpoint that reads back safely; each one skipped on the
    way is named in a warning."""
    for path in checkpoints(ckpt_dir):
        try:
            return path, *read_checkpoint(path)
        except UnreadableCheckpoint as exc:
            logger.warning("skipping %s, which cannot be read safely (%s): trying the checkpoint before it",
                           path.name, exc)
    return None


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
