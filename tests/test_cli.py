"""`desctune run`: the summary a user reads, and one-line errors with exit 2 for mistakes they can fix."""

import os
import shlex
import socket
import subprocess
import sys

import yaml

from conftest import tiny_config


def write_profile(tmp_path, cfg) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def test_run_prints_the_summary(local_run):
    """The shared `desctune run` (conftest.py's `local_run`): the summary ends with the command that shows the run
    and its two pages at the addresses that command serves."""
    out = local_run.stdout
    for expected in ("records    read 40, kept", "splits     train", "training   loss", "plan       cpu: ", "base",
                     "fine-tuned", "registry   cli-tiny version 1, aliases:", "challenger"):
        assert expected in out
    ui = shlex.join([".venv/bin/desctune", "ui", *local_run.args])
    assert f"See this run (`{ui}` starts both UIs on this run; Ctrl-C stops them):" in out, out
    assert f"Prefect UI:  http://127.0.0.1:{local_run.prefect_port}/runs/flow-run/" in out
    assert f"MLflow UI:   http://127.0.0.1:{local_run.mlflow_port}/#/experiments/" in out


def desctune(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_ui_refuses_a_bad_or_taken_port_in_one_line_with_exit_2(tmp_path):
    at = ["--set", f"artifacts_dir={tmp_path / 'artifacts'}"]
    bad_flag = desctune("ui", *at, "--mlflow-port", "70000")
    assert (bad_flag.returncode, bad_flag.stderr) == (2, "desctune: --mlflow-port 70000: a port is a number from 1 "
                                                         "to 65535\n")
    bad_env = desctune("ui", *at, env={**os.environ, "DESCTUNE_UI_PREFECT_PORT": "http"})
    assert (bad_env.returncode, bad_env.stderr) == (2, "desctune: DESCTUNE_UI_PREFECT_PORT=http: a port is a number "
                                                       "from 1 to 65535\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = desctune("ui", *at, "--prefect-port", str(port))
    assert taken.returncode == 2 and len(taken.stderr.splitlines()) == 1, taken.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in taken.stderr and "--prefect-port" in taken.stderr


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
