"""What each rank runs under torchrun (`python -m desctune.training.rank JOB.json`, started by
`desctune.training.launch`): join the group, train with `train_adapter`, and on rank 0 write the result beside the
job."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from desctune.config import Config
from desctune.files import atomic_path
from desctune.training.distributed import World, die_with_parent
from desctune.training.loop import train_adapter


def rank_logger(world: World) -> logging.Logger:
    """Rank 0 logs progress to stdout (the launcher relays it); the other ranks only warnings, marked with their
    rank."""
    logger = logging.getLogger(f"desctune.rank{world.rank}")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if world.main else f"[rank {world.rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if world.main else logging.WARNING)
    logger.propagate = False
    return logger


def main(argv: list[str] | None = None) -> int:
    """One rank: join the group, train with `train_adapter`, and on rank 0 write its result beside the job."""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    die_with_parent()
    world = World.from_env()
    logger = rank_logger(world)
    log_params, log_metrics = (lambda params: None), (lambda metrics, step: None)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if world.main and job.get("run_id") and tracking_uri:
        from desctune.tracking import mlflow_sink

        log_params, log_metrics = mlflow_sink(job["run_id"], tracking_uri)
    result = train_adapter(job["tokens"], job["base"], Config.model_validate(job["config"]), Path(job["out_dir"]),
                           logger, log_params, log_metrics, progress_seconds=float(job.get("progress_seconds", 20)),
                           world=world)
    if world.main:
        with atomic_path(job["result"]) as tmp:
            tmp.write_text(json.dumps(result))
    world.barrier()  # the other ranks end only after the result is written
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())  # an exception's message reaches torchrun's failure record
