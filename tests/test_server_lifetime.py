"""Prefect's temporary API server lives exactly as long as the `desctune run` that started it: killed with
SIGKILL, the command takes its server along (no process left, no port still open)."""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import yaml

from conftest import ROOT, SAMPLE, head_records, tiny_config

START_TIMEOUT = 300  # the command imports Prefect, torch and MLflow on a busy 2-core machine
GONE_TIMEOUT = 60


def _server_of(pid: int) -> psutil.Process | None:
    """The temporary Prefect API server among `pid`'s descendants, once it accepts connections."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "prefect.server.api.server:create_app" in argv and _listening(_port(argv)):
            return child
    return None


def _port(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_kill_9_of_desctune_run_takes_its_temporary_prefect_server_along(tmp_path, tiny_model_dir):
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 40)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15})
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    run = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--config", str(profile)], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while server is None and run.poll() is None and time.monotonic() < deadline:
            server = _server_of(run.pid)
            time.sleep(0.2)
        assert server is not None, (f"no temporary Prefect server answered under `desctune run` within "
                                    f"{START_TIMEOUT} s (run exit code {run.poll()})")
        port = _port(server.cmdline())
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
        deadline = time.monotonic() + GONE_TIMEOUT
        while (server.is_running() and server.status() != psutil.STATUS_ZOMBIE or _listening(port)) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
        assert not alive and not _listening(port), (
            f"{GONE_TIMEOUT} s after `desctune run` was killed, its Prefect server (pid {server.pid}) is "
            f"{'still running' if alive else 'gone'} and port {port} is {'open' if _listening(port) else 'closed'}")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if server is not None and server.is_running():  # a server left behind, re-parented to init
            server.kill()
