"""Resume: a training process killed with SIGKILL right after a checkpoint resumes from it and finishes the run, and
the MLflow run it left RUNNING is marked FAILED when the next run starts; a tampered checkpoint is refused and training
resumes from the one before."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_config
from desctune.models import provision
from desctune.tracking import client
from desctune.training.checkpoint import latest_checkpoint
from desctune.training.loop import train_adapter
from tasks.register import start_tracking
from test_train import records, token_files

CHILD = """
import json, sys, time
from pathlib import Path
from desctune.config import Config
from desctune.registry.lineage import start_run
from desctune.tracking import mlflow_sink, tracking_uri
from desctune.training.loop import train_adapter

args = json.loads(sys.argv[1])
cfg = Config.model_validate(args["cfg"])
run_id = start_run(cfg, {"prefect.flow_run_id": args["flow_run_id"]})
Path(args["run_id"]).write_text(run_id)

def stall(step, path):
    Path(args["marker"]).write_text(str(step))
    time.sleep(600)

log_params, log_metrics = mlflow_sink(run_id, tracking_uri(cfg))
train_adapter(args["tokens"], args["base"], cfg, Path(args["out"]), log_params=log_params, log_metrics=log_metrics,
              on_checkpoint=stall)
"""


def running_flow_run() -> str:
    """A real Prefect flow run in state Running: what a `desctune run` killed with SIGKILL leaves in Prefect."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="killed-run")
    def killed_run():
        pass

    with get_client(sync_client=True) as prefect:
        return str(prefect.create_flow_run(killed_run, state=Running()).id)


def test_kill_9_after_a_checkpoint_then_rerun_resumes(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 12, "save_steps": 4, "batch_size": 4})
    df = records(40)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:32], df.iloc[32:])
    base = provision(str(tiny_model_dir), tmp_path)
    out, marker, run_file = tmp_path / "train", tmp_path / "checkpointed", tmp_path / "run_id"
    flow_run_id = running_flow_run()
    args = {"tokens": tokens, "base": base, "cfg": json.loads(cfg.model_dump_json()), "out": str(out),
            "marker": str(marker), "run_id": str(run_file), "flow_run_id": flow_run_id}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the training process died before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert marker.read_text() == "4"
    assert not (out / "adapter").exists()
    (out / "checkpoints" / ".checkpoint-8.tmp-half-written").mkdir()
    (out / "checkpoints" / "checkpoint-9").mkdir()
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-4"
    mlflow, killed_run = client(cfg), run_file.read_text()
    assert mlflow.get_run(killed_run).info.status == "RUNNING"  # nothing was left to end it

    next_run = start_tracking.fn(cfg)  # the next run starts: Prefect still says Running, but the process is gone
    killed = mlflow.get_run(killed_run)
    assert killed.info.status == "FAILED"
    assert killed.data.tags["desctune.failed_because"] == f"its process (pid {child.pid} on {socket.gethostname()}) is gone"
    assert mlflow.get_run(next_run).info.status == "RUNNING"

    result = train_adapter(tokens, base, cfg, out)
    assert result["resumed_from"] == str(out / "checkpoints" / "checkpoint-4")
    assert result["steps"] == 12
    assert [h["step"] for h in result["history"]][:3] == [1, 2, 4]
    assert result["history"][-1]["step"] == 12
    assert (Path(result["adapter_path"]) / "adapter_model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".checkpoint-*"))


class RunsCode:
    """What a tampered checkpoint could hold: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_checkpoint_is_refused_not_run_and_training_resumes_from_the_one_before(tmp_path, tiny_model_dir,
                                                                                           tiny_tokenizer, caplog):
    import torch

    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 8, "save_steps": 3, "batch_size": 4})
    df = records(30)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:24], df.iloc[24:])
    base = provision(str(tiny_model_dir), tmp_path)
    out, marker = tmp_path / "train", tmp_path / "code-ran"
    stop = RuntimeError("stop after the second checkpoint")

    def stop_at_6(step, path):
        if step == 6:
            raise stop

    try:
        train_adapter(tokens, base, cfg, out, on_checkpoint=stop_at_6)
    except RuntimeError as exc:
        assert exc is stop
    newest = out / "checkpoints" / "checkpoint-6" / "training.pt"
    torch.save({"adapter": RunsCode(marker)}, newest)
    with caplog.at_level("WARNING"):
        result = train_adapter(tokens, base, cfg, out)
    assert not marker.exists()
    assert result["resumed_from"] == str(out / "checkpoints" / "checkpoint-3") and result["steps"] == 8
    assert any("skipping checkpoint-6, which cannot be read safely" in r.getMessage() for r in caplog.records)
