"""Resume: a training process killed with SIGKILL right after a checkpoint resumes from it and finishes the run; a
tampered checkpoint is refused and training resumes from the one before."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_config
from desctune.models import provision
from desctune.train import latest_checkpoint, train_adapter
from test_train import records, token_files

CHILD = """
import json, sys, time
from pathlib import Path
from desctune.config import Config
from desctune.train import train_adapter

args = json.loads(sys.argv[1])

def stall(step, path):
    Path(args["marker"]).write_text(str(step))
    time.sleep(600)

train_adapter(args["tokens"], args["base"], Config.model_validate(args["cfg"]), Path(args["out"]), on_checkpoint=stall)
"""


def test_kill_9_after_a_checkpoint_then_rerun_resumes(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 12, "save_steps": 4, "batch_size": 4})
    df = records(40)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:32], df.iloc[32:])
    base = provision(str(tiny_model_dir), tmp_path)
    out, marker = tmp_path / "train", tmp_path / "checkpointed"
    args = {"tokens": tokens, "base": base, "cfg": json.loads(cfg.model_dump_json()), "out": str(out),
            "marker": str(marker)}
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
