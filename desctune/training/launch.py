"""Training in several processes: the train stage's inputs go to a job file, torchrun starts the ranks
(`desctune.training.rank`), their output is relayed line by line, and rank 0's result is read back.

The subprocess is torchrun itself (`torch.distributed.run`, same arguments and code) run through `main` below,
which records the first failed rank in a JSON file, so a rank that dies (kill -9, out of memory) ends the stage with
one line naming it and the signal or exit code, and the next run resumes from the newest checkpoint. The group is
tied to the caller: its own session, stopped with SIGTERM (torchrun then stops the ranks) when the caller is
interrupted, and the kernel signals the agent when the caller dies and each rank when the agent dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from desctune.config import Config, TrainConfig
from desctune.errors import UserError
from desctune.files import atomic_path, make_dirs

log = logging.getLogger(__name__)

STOP_SECONDS = 60  # how long torchrun gets to stop its ranks after SIGTERM before the group is killed
# Errors a rank raises when another rank went away first: never the cause of a failure when there is another.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "ProcessGroupGloo", "Socket Timeout")


class RankFailed(RuntimeError):
    """A training process died or raised; Prefect's retry (or the next run) resumes from the newest checkpoint."""


class NotNodeZero(UserError):
    """This machine's ranks trained their share; node 0 holds the adapter and carries the run on."""


def torchrun_args(t: TrainConfig) -> list[str]:
    """torchrun's arguments: one machine meets on a free local port (--standalone); several use the static
    rendezvous at node 0's host:port, so rank 0, which writes the checkpoints, is always on node 0."""
    args = [f"--nproc-per-node={t.nproc_per_node}", "--max-restarts=0", "--monitor-interval=0.5"]
    if t.nnodes == 1 and not t.rdzv_endpoint:
        return [*args, "--standalone"]
    host, _, port = t.rdzv_endpoint.rpartition(":")
    return [*args, f"--nnodes={t.nnodes}", f"--node-rank={t.node_rank}", f"--master-addr={host.strip('[]')}",
            f"--master-port={port}"]


def rank_env(t: TrainConfig, tracking_uri: str | None = None) -> dict:
    """The ranks' environment: this checkout first on the path (the ranks run the caller's code), output unbuffered
    and without progress bars, and each rank an equal share of the CPU's threads unless OMP_NUM_THREADS says
    otherwise (torchrun would give each one thread). The tracking URI travels here rather than in the job file, so a
    password in it is never written to disk."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}  # lines go to a log: no progress bars
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // t.nproc_per_node)))
    return env


def describe(failure: dict) -> str:
    """'rank 1 (local rank 1, pid 123) was killed by SIGKILL', or '... exited with code 1: ' and the first line of
    its error."""
    code = failure["exitcode"]
    how = (f"was killed by {failure['signal']}" if code < 0 else f"exited with code {code}")
    where = f"local rank {failure['local_rank']}, pid {failure['pid']}"
    message = (failure.get("message") or "").strip()
    message = message.splitlines()[0][:200] if message and code > 0 else ""
    return f"rank {failure['rank']} ({where}) {how}" + (f": {message}" if message else "")


def train_under_torchrun(tokens: dict, base: dict, cfg: Config, out_dir: Path,
                         logger: logging.Logger | logging.LoggerAdapter = log, run_id: str | None = None,
                         tracking_uri: str | None = None, progress_seconds: float = 20.0) -> dict:
    """`train_adapter`'s result, trained by cfg.train.nproc_per_node x nnodes processes under torchrun."""
    t = cfg.train
    folder = Path(out_dir) / "torchrun"
    make_dirs(folder)
    job, result, failure = folder / "job.json", folder / "result.json", folder / "failure.json"
    for stale in (result, failure):
        stale.unlink(missing_ok=True)
    with atomic_path(job) as tmp:
        tmp.write_text(json.dumps({
            "tokens": tokens, "base": base, "config": json.loads(cfg.model_dump_json()), "out_dir": str(out_dir),
            "run_id": run_id, "progress_seconds": progress_seconds,
            "result": str(result),
        }))
    cmd = [sys.executable, "-m", "desctune.training.launch", str(failure), *torchrun_args(t),
           "-m", "desctune.training.rank", str(job)]
    logger.info("training in %d process(es) on %d machine(s) under torchrun", t.nproc_per_node * t.nnodes, t.nnodes)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=rank_env(t, tracking_uri), start_new_session=True)
    try:
        for line in proc.stdout:
            if line.strip():
                logger.info("%s", line.rstrip())
        code = proc.wait()
    finally:
        stop(proc)
    if code != 0:
        why = describe(json.loads(failure.read_text())) if failure.is_file() else f"torchrun exited with code {code}"
        raise RankFailed(f"training under torchrun failed: {why}; the next run resumes from the newest checkpoint "
                         "in " + str(Path(out_dir) / "checkpoints")) from None
    if not result.is_file():
        raise NotNodeZero(f"this machine (node {t.node_rank} of {t.nnodes}) trained its share; node 0 wrote the "
                          "adapter and carries the run on")
    return json.loads(result.read_text())


def stop(proc: subprocess.Popen) -> None:
    """End torchrun's group if it still runs: SIGTERM (torchrun stops its ranks), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failure_message(failure) -> str:
    """A torchelastic ProcessFailure's message: from the rank's error file ("Type: text") or made up for a signal."""
    message = failure.message
    return str(message.get("message", "") if isinstance(message, dict) else message or "")


def root_cause(failures: dict) -> tuple[int, object]:
    """The failure that started it: a rank killed by a signal other than torchrun's SIGTERM, else the earliest
    error that is not a peer having gone away, else the earliest."""

    def key(item):
        rank, f = item
        return (f.exitcode == -signal.SIGTERM, f.exitcode > 0, any(m in failure_message(f) for m in PEER_GONE),
                f.timestamp, rank)

    return min(failures.items(), key=key)


def main(argv: list[str] | None = None) -> int:
    """torchrun (`torch.distributed.run`) with ARGV[1:], recording its first failed rank in the file ARGV[0]."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from desctune.training.distributed import die_with_parent

    failure_file, *args = sys.argv[1:] if argv is None else argv
    die_with_parent(signal.SIGTERM)
    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        rank, f = root_cause(exc.failures)
        record = {"rank": rank, "local_rank": f.local_rank, "pid": f.pid, "exitcode": f.exitcode,
                  "signal": f.signal_name() if f.exitcode < 0 else None, "message": failure_message(f)}
        with atomic_path(failure_file) as tmp:
            tmp.write_text(json.dumps(record))
        print(f"torchrun: {describe(record)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
