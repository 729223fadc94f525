"""`desctune run`: the summary a user reads, and one-line errors with exit 2 for mistakes they can fix."""

import subprocess
import sys

import yaml

from app.cli import main
from conftest import SAMPLE, head_records, tiny_config


def write_profile(tmp_path, cfg) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def test_run_prints_the_summary(tmp_path, tiny_model_dir, capsys):
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 40)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15})
    assert main(["run", "--config", write_profile(tmp_path, cfg), "--set", "registry.model_name=cli-tiny"]) == 0
    out = capsys.readouterr().out
    for expected in ("records    read 40, kept", "splits     train", "training   loss", "plan       cpu: ", "base",
                     "fine-tuned", "registry   cli-tiny version 1, aliases:", "challenger", "Prefect UI:",
                     "MLflow UI:"):
        assert expected in out


def desctune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120)


def test_user_errors_are_one_line_with_exit_2(tmp_path, tiny_model_dir):
    missing = desctune("run", "--config", str(tmp_path / "missing.yaml"))
    want = f"desctune: config file not found: {tmp_path / 'missing.yaml'}\n"
    assert (missing.returncode, missing.stderr) == (2, want)
    cfg = tiny_config(tmp_path, tiny_model_dir, tmp_path / "no-such-data.jsonl")
    no_data = desctune("run", "--config", write_profile(tmp_path, cfg))
    assert no_data.returncode == 2 and len(no_data.stderr.splitlines()) == 1
    assert "no-such-data.jsonl does not exist" in no_data.stderr
    no_test = desctune("run", "--set", f"eval.test_path={tmp_path / 'no-such-test.jsonl'}")
    assert no_test.returncode == 2 and len(no_test.stderr.splitlines()) == 1
    assert f"eval.test_path {tmp_path / 'no-such-test.jsonl'} does not exist" in no_test.stderr
    bad_set = desctune("run", "--set", "train.epochs=many")
    assert bad_set.returncode == 2 and bad_set.stderr.startswith("desctune: invalid config at train.epochs")
