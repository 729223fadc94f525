"""The registry's lock per model (a Prefect concurrency limit) is created by whichever run needs it first: two
runs that create it at once against one fresh Prefect database both go on, and the server logs no error."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import ROOT, SESSION_ENV, free_port

READY_TIMEOUT = 180
RACE_TIMEOUT = 300
NAMES = 12

RACER = """
import sys, time
from pathlib import Path
from tasks.register import one_registration_at_a_time
folder, me = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
for i in range(int(sys.argv[3])):
    with one_registration_at_a_time(f"race model {i}"):
        pass
"""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def race(tmp_path: Path) -> tuple[list[int], list[str], str]:
    """A fresh Prefect server and two processes calling it at once: their exit codes, their outputs and the server's
    log. Begun in the session's background lane (conftest.py: `registration_race_started`)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in SESSION_ENV.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env={**env, "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            stdout=out, stderr=subprocess.STDOUT)
    # The racers start with the server (their imports take as long as its start) and wait for "go" to call it.
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(n), str(NAMES)],
                               env={**env, "PREFECT_API_URL": api}, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for n in range(2)]
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _healthy(api):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        deadline = time.monotonic() + RACE_TIMEOUT
        while not all((tmp_path / f"ready-{n}").exists() for n in range(2)):
            assert all(r.poll() is None for r in racers) and time.monotonic() < deadline, "a racer never got ready"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [r.communicate(timeout=RACE_TIMEOUT)[0] for r in racers]
        return [r.returncode for r in racers], outputs, log.read_text()
    finally:
        for proc in (*racers, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_two_runs_creating_the_registration_lock_at_once_both_succeed_without_a_server_error(
        registration_race_started):
    codes, outputs, server_log = registration_race_started.result()
    assert codes == [0, 0], outputs
    assert "ERROR" not in server_log and "Traceback" not in server_log, server_log[-3000:]
    assert not [o for o in outputs if "ERROR" in o or "Traceback" in o], outputs
