"""Prefect's temporary API server, started the moment a command begins instead of when its flow first needs it.

Without a configured API, Prefect starts a temporary server (uvicorn on `prefect.server.api.server:create_app`) the
first time a flow asks for a client: the command first imports Prefect and the flow, then imports Prefect's server
package in its own process only to find the class that starts it, and only then starts the server, which imports the
same packages again and opens its database — about 11 s before any work on this 2-core machine, one step after the
other. `EarlyServer()` starts the very same server process first thing, before the command imports Prefect, so
its start overlaps everything the command does before the flow; the command then points Prefect at it and stops it
when done. When an API is configured (PREFECT_API_URL in the environment, a profile or prefect.toml), or when Prefect
is already loaded in this process (a test calling the command, which may hold a server already), it starts nothing
(or stops what it started) and Prefect does what it always does.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from desctune.errors import ServeError

# What Prefect's own SubprocessASGIServer sets for its server process (no UI, the temporary server's services).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the server's process before it starts (Linux): the kernel sends it SIGKILL when the command that
    started it exits, even by SIGKILL, so no server outlives its command (one left behind holds ~300 MB and its port
    for good). Exits at once when the command is already gone."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _spawn(port: int, env: dict) -> subprocess.Popen:
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # found without importing Prefect
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env={**os.environ, **env, **SERVER_ENV}, preexec_fn=_die_with_parent,
    )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _prefect_would_start_one() -> bool:
    """Whether Prefect, now imported, has no API configured, so its client would start a temporary server."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def _drain_prefect_workers(timeout: float = 30) -> None:
    """Send the log lines and events Prefect still queues to the server while it is up. Left to Prefect's exit
    handlers they met a stopped server: "Error logging to API" at exit, after over a minute of retries on a large
    input with PREFECT_LOGGING_LEVEL=INFO."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


class EarlyServer:
    """Prefect's temporary API server, started on construction (before Prefect is imported, from the thread that
    stays until the command ends: the server dies with it); `use()` points Prefect at it once it answers, `stop()`
    ends it. Starts nothing when an API URL is in the environment or Prefect is already loaded in this process.

    `env` adds to the server's environment (`desctune run`: its database, PREFECT_API_DATABASE_CONNECTION_URL).
    `ui_url`: the Prefect UI that will show what this server records (it has none itself), PREFECT_UI_URL inside
    `use()`, so the links Prefect and desctune make name it instead of this server's passing port."""

    def __init__(self, env: dict | None = None, ui_url: str | None = None) -> None:
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.env, self.ui_url = dict(env or {}), ui_url
        if "prefect" not in sys.modules and not os.environ.get("PREFECT_API_URL"):
            self._start()

    def _start(self) -> None:
        port = _free_port()
        self.proc, self.url = _spawn(port, self.env), f"http://127.0.0.1:{port}/api"

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Inside the block Prefect (imported by now) talks to this server. When Prefect has an API configured after
        all (a profile, prefect.toml), the server is stopped and Prefect left as it is."""
        if self.proc is None or not _prefect_would_start_one():
            self.stop()
            yield
            return
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            PREFECT_UI_URL,
            temporary_settings,
        )

        self._wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        settings = {PREFECT_API_URL: self.url}
        if self.ui_url and not PREFECT_UI_URL.value():
            settings[PREFECT_UI_URL] = self.ui_url
        # The environment too, for what reads settings outside this context (threads Prefect starts for events).
        os.environ.update({setting.name: value for setting, value in settings.items()})
        try:
            with temporary_settings(updates=settings):
                try:
                    yield
                finally:
                    _drain_prefect_workers()
        finally:
            for setting in settings:
                os.environ.pop(setting.name, None)

    def _wait(self, timeout: float) -> None:
        deadline, retried = time.monotonic() + timeout, False
        while not _healthy(self.url):
            if self.proc.poll() is not None:
                if retried:
                    raise ServeError(f"Prefect's temporary API server exited with code {self.proc.returncode}; "
                                     "`prefect server start` shows why, or set PREFECT_API_URL to a running server")
                self._start()  # most likely the port was taken between choosing it and binding it: once more
                retried = True
            if time.monotonic() > deadline:
                raise ServeError(f"Prefect's temporary API server did not answer within {timeout:g} s; on a busy "
                                 "machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set "
                                 "PREFECT_API_URL to a running server")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
