"""Training under torchrun: two real gloo processes on the CPU train the same adapter as one process with the same
global batch; a rank killed with SIGKILL fails the stage in one line naming it, and the rerun resumes to the same
adapter; the launch settings are validated. The tiny random Llama keeps each torchrun run to seconds."""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from conftest import tiny_config
from desctune.config import load_config
from desctune.errors import ConfigError
from desctune.models import provision
from desctune.stages import stage_folder
from desctune.training.distributed import micro_batches_per_step, shard
from desctune.training.launch import (
    RankFailed,
    describe,
    failure_message,
    root_cause,
    torchrun_args,
    train_under_torchrun,
)
from desctune.training.batching import load_examples, micro_batches
from desctune.training.loop import train_adapter
from test_train import records, token_files

# fp32 on both sides; what differs is only the order of float sums (per-rank partial gradients added by the
# all-reduce, narrower batches), which Adam can magnify for gradients near zero. A wrong gradient (a rank stepping on
# its own half, or the loss normalised per rank) is more than 100x this away (test below).
ATOL = 1e-5
TRAIN = {"max_steps": 7, "save_steps": 3, "batch_size": 4, "grad_accum": 1, "logging_steps": 1,
         "learning_rate": 5e-3, "compile": False}


def adapter(result: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(result["adapter_path"]) / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def setup(tmp_path: Path, model_dir: Path, tokenizer, n_train: int = 26, **train):
    # 25 examples (one of the 26 is too long) in batches of 4: one micro-batch of 1 example in each epoch
    cfg = tiny_config(tmp_path, model_dir, model={"dtype": "fp32"}, train={**TRAIN, **train})
    df = records(n_train + 6, max_chars=300)
    return cfg, token_files(tmp_path, tokenizer, cfg, df.iloc[:n_train], df.iloc[n_train:]), provision(
        str(model_dir), tmp_path)


@pytest.mark.parametrize("grad_accum, size", [(1, 2), (2, 2), (3, 2), (4, 4), (2, 3)])
def test_shards_are_disjoint_and_together_exactly_each_steps_examples(grad_accum, size):
    lengths = [int(x) for x in torch.randint(10, 200, (61,), generator=torch.Generator().manual_seed(0))]
    cfg = load_config(None, [f"train.batch_size=4", f"train.grad_accum={grad_accum}", "train.max_steps=9"])
    schedule = micro_batches(lengths, cfg.train, 9)
    placeholder = len(lengths)
    per_step = micro_batches_per_step(grad_accum, size)
    shares = [shard(schedule, grad_accum, rank, size, placeholder) for rank in range(size)]
    assert all(len(s) == 9 * per_step for s in shares)  # every rank runs the same number of micro-batches
    for step in range(9):
        want = sorted(i for batch in schedule[step * grad_accum : (step + 1) * grad_accum] for i in batch)
        got = [i for s in shares for batch in s[step * per_step : (step + 1) * per_step] for i in batch
               if i != placeholder]
        assert sorted(got) == want  # disjoint (no duplicate) and covering
    if grad_accum % size:  # split micro-batches: a share is never more than a rank's part of its batch plus one
        assert all(len(b) <= -(-4 // size) for s in shares for b in s)
    assert shard(schedule, grad_accum, 0, 1, placeholder) == schedule


def test_launch_settings_are_validated_in_one_line():
    for override, message in (("train.nproc_per_node=0", "greater than or equal to 1"),
                              ("train.nnodes=2", "need rdzv_endpoint"),
                              ("train.node_rank=1", "node_rank 1 must be below nnodes 1"),
                              ("train.rdzv_endpoint=node0", "must be host:port"),
                              ("train.launcher=mpirun", "'auto' or 'torchrun'")):
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)
    t = load_config(None, ["train.nnodes=2", "train.node_rank=1", "train.rdzv_endpoint=node0:29500"]).train
    assert t.distributed and torchrun_args(t)[-4:] == ["--nnodes=2", "--node-rank=1", "--master-addr=node0",
                                                       "--master-port=29500"]
    one = load_config(None, []).train
    assert not one.distributed and one.updated(launcher="torchrun").distributed
    assert "--standalone" in torchrun_args(one.updated(nproc_per_node=2))


def test_the_failed_rank_named_is_the_cause_not_a_rank_that_lost_its_peer_or_was_stopped(tmp_path):
    """torchelastic's own failure records: rank 1 raised, rank 0 then lost its peer, rank 2 was stopped by torchrun;
    with a rank killed by a signal, that one is named."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def error_file(name: str, text: str, timestamp: int) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({"message": {"message": text, "extraInfo": {"py_callstack": "Traceback ...",
                                                                               "timestamp": str(timestamp)}}}))
        return str(path)

    lost = ProcessFailure(0, 100, 1, error_file("0.json", "RuntimeError: [gloo] Connection closed by peer", 5))
    raised = ProcessFailure(1, 101, 1, error_file("1.json", "ModelError: cannot load the model at /m\nmore", 6))
    stopped = ProcessFailure(2, 102, -signal.SIGTERM, "<N/A>")
    rank, cause = root_cause({0: lost, 1: raised, 2: stopped})
    assert rank == 1 and failure_message(cause).startswith("ModelError")
    record = {"rank": 1, "local_rank": 1, "pid": 101, "exitcode": 1, "signal": None, "message": failure_message(cause)}
    assert describe(record) == ("rank 1 (local rank 1, pid 101) exited with code 1: "
                                "ModelError: cannot load the model at /m")
    killed = ProcessFailure(3, 103, -signal.SIGKILL, "<N/A>")
    assert root_cause({0: lost, 1: raised, 2: stopped, 3: killed})[0] == 3
    assert describe({"rank": 3, "local_rank": 3, "pid": 103, "exitcode": -9, "signal": killed.signal_name(),
                     "message": failure_message(killed)}) == "rank 3 (local rank 3, pid 103) was killed by SIGKILL"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """The same 7 steps (one epoch) in one process and in two torchrun processes: grad_accum 1, so every
    micro-batch is split between the ranks, and its micro-batch of one example gives rank 1 the placeholder."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg, tokens, base = setup(tmp, tiny_model_dir, tiny_tokenizer)
    lengths = [len(x) for x, _ in load_examples(tokens["train"]["path"])]
    assert [len(b) for b in micro_batches(lengths, cfg.train, 7)].count(1) == 1
    one = train_adapter(tokens, base, cfg, tmp / "one")
    lines: list[str] = []

    class Lines:
        def info(self, fmt, *args):
            lines.append(fmt % args)

        warning = info

    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_id = MlflowClient(tracking_uri).create_run(
        MlflowClient(tracking_uri).create_experiment("ddp", artifact_location=str(tmp / "mlruns"))).info.run_id
    two = train_under_torchrun(tokens, base, distributed(cfg), tmp / "two", Lines(), run_id, tracking_uri)
    two["tracking"] = (tracking_uri, run_id)
    return cfg, tokens, base, one, two, lines, tmp


def distributed(cfg, **train):
    return cfg.model_copy(update={"train": cfg.train.updated(nproc_per_node=2, **train)})


def test_two_gloo_processes_train_the_adapter_one_process_trains(runs):
    cfg, tokens, base, one, two, lines, tmp = runs
    assert two["steps"] == one["steps"] == 7
    assert max_difference(adapter(one), adapter(two)) < ATOL
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    # the same supervised tokens over the run, split between the ranks
    assert round(two["supervised_tokens_per_s"] * two["seconds"]) == round(
        one["supervised_tokens_per_s"] * one["seconds"])
    assert (tmp / "two" / "checkpoints" / "checkpoint-6").is_dir()  # written by rank 0
    assert any("training in 2 process(es)" in line for line in lines)
    assert any(line.startswith("train step 7/7 (100%)") for line in lines)  # rank 0's progress, relayed
    assert not any(line.startswith("[rank 1]") for line in lines)  # the other rank only warns


def test_rank_0_logs_to_mlflow_and_the_tracking_uri_never_reaches_the_job_file(runs):
    """The tracking URI may carry a database password: the ranks get it in their environment, not on disk."""
    *_, two, _, tmp = runs
    tracking_uri, run_id = two["tracking"]
    assert tracking_uri not in (tmp / "two" / "torchrun" / "job.json").read_text()
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert "train/loss" in run.data.metrics and any(k.startswith("train_plan.") for k in run.data.params)


def test_the_comparison_would_see_a_wrong_gradient(runs):
    """Each rank stepping on its own half of the batch (no all-reduce, or the loss normalised per rank) trains
    like one process with half the batch: that adapter is far outside the tolerance."""
    cfg, tokens, base, one, _, _, tmp = runs
    half = cfg.model_copy(update={"train": cfg.train.updated(batch_size=2)})
    assert max_difference(adapter(one), adapter(train_adapter(tokens, base, half, tmp / "half"))) > 100 * ATOL


def typed(tokens: dict, base: dict):
    """The tokenize stage's result for token files written by the tests' helper (`test_train.token_files`)."""
    import pyarrow.parquet as pq

    from desctune.results import Location, TokenizeResult, TokenSplit

    def split(name: str) -> TokenSplit:
        table = pq.read_table(tokens[name]["path"])
        ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
        return TokenSplit.written(tokens[name]["path"], tokens[name]["sha256"], rows=table.num_rows, dropped={},
                                  truncated=0, tokens=sum(map(len, ids)),
                                  supervised_tokens=sum(t != -100 for row in labels for t in row))

    return TokenizeResult(tokenizer=Location(path=base["path"]), train=split("train"), val=split("val"))


def descendant_with_rank(root: int, rank: int) -> int | None:
    """The pid of the process below `root` that torchrun started as `rank` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in env):
            return pid
        todo += children.get(pid, [])
    return None


def kill_rank_after_checkpoint(out: Path, rank: int, step: int, killed: dict) -> threading.Thread:
    """In the background: find torchrun's `rank`, and SIGKILL it as soon as checkpoint-`step` is in place."""

    def run():
        deadline = time.monotonic() + 300
        pid = None
        while time.monotonic() < deadline and not (out / "checkpoints" / f"checkpoint-{step}").is_dir():
            pid = pid or descendant_with_rank(os.getpid(), rank)
            time.sleep(0.005)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_kill_9_of_a_rank_fails_the_task_in_one_line_and_prefects_retry_resumes_to_the_same_adapter(
        runs, tiny_model_dir):
    """Through the real train task in a Prefect flow, two ranks dealt whole micro-batches (grad_accum 2): rank 1
    is killed right after the first checkpoint of 14 steps; the attempt fails naming it and the signal, Prefect's
    retry resumes from a checkpoint and ends with the adapter of one uninterrupted process."""
    from prefect import flow
    from prefect.logging import LogEavesdropper

    from desctune.results import BaseModelResult
    from tasks.train import train

    cfg, tokens, base, _, _, _, tmp = runs
    cfg = cfg.model_copy(update={"artifacts_dir": str(tmp / "artifacts"),
                                 "train": cfg.train.updated(grad_accum=2, max_steps=14, save_steps=2)})
    whole = train_adapter(tokens, base, cfg, tmp / "whole")

    @flow(name="train-under-torchrun")
    def train_only(config):
        return train(typed(tokens, base), BaseModelResult.from_core(base), config.model, config.lora, config.train,
                     config.artifacts_dir)

    two = distributed(cfg)
    out = stage_folder(two.artifacts_dir, "train", tokens["train"]["sha256"], tokens["val"]["sha256"], base["sha256"],
                       two.model, two.lora, two.train)
    killed: dict = {}
    watcher = kill_rank_after_checkpoint(out, 1, 2, killed)
    with LogEavesdropper("prefect.task_runs", level=logging.INFO) as log:
        resumed = train_only(two)
    watcher.join()
    failed = [line for line in log.text().splitlines() if "Task run failed" in line]
    assert len(failed) == 1 and f"RankFailed('training under torchrun failed: rank 1 (local rank 1, pid " \
        f"{killed['pid']}) was killed by SIGKILL; the next run resumes from the newest checkpoint in {out}" \
        f"/checkpoints') - Retry 1/1 will start" in failed[0]
    assert "resuming from checkpoint-" in log.text()
    assert descendant_with_rank(os.getpid(), 0) is None  # nothing of the group is left
    assert resumed.resumed_from and int(resumed.resumed_from.path.rsplit("-", 1)[1]) >= 2
    assert resumed.steps == 14 and resumed.adapter.path == str(out / "adapter")
    assert max_difference(adapter(whole), adapter({"adapter_path": resumed.adapter.path})) < ATOL
