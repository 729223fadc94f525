"""Stop a deployed flow run when the worker that started it dies, instead of leaving it hung.

A process worker starts each flow run as its own child, in its own session, with the run's output piped to the
worker. When only the worker is killed, the run's next write to that pipe fails (Prefect's rich console handler
turns it into SystemExit, in whichever thread logs) and the process can hang for good without reporting. Flows call
`exit_with_worker()` first thing: when DESCTUNE_EXIT_WITH_WORKER=1 (prefect.yaml sets it for every deployment, so
`desctune run` from a shell is untouched) a daemon thread watches the parent pid, and wakes at once when the worker's
end of the output pipe closes. When the parent is gone it points stdout and stderr at /dev/null (nothing fails on the
dead pipe any more), logs why through the run logger, sends the logs to the Prefect API and sends SIGTERM to its own
process: Prefect's flow engine turns that into a Crashed state, runs the flow's on_crashed hooks (finetune marks its
MLflow run failed) and lets the signal end the process. Should the process still be there `GRACE` seconds later, it
exits hard (the heartbeat automation then marks the run Crashed).
"""

from __future__ import annotations

import contextvars
import logging
import os
import select
import signal
import stat
import threading
import time
from typing import Callable

ENV = "DESCTUNE_EXIT_WITH_WORKER"
INTERVAL = 2.0  # seconds between looks at the parent pid when no output pipe wakes the watchdog first
GRACE = 60.0  # seconds SIGTERM gets to end the run before the process exits hard

_watching: threading.Thread | None = None
_lock = threading.Lock()


def message(parent: int) -> str:
    return (f"the worker that started this run (pid {parent}) died; stopping so the run can be triggered again: "
            "finished stages come from the cache and training resumes from its newest checkpoint")


def _pipes(fds=(1, 2)) -> list[int]:
    out = []
    for fd in fds:
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                out.append(fd)
        except OSError:
            pass
    return out


def watch(on_orphaned: Callable[[int], None], interval: float = INTERVAL) -> threading.Thread:
    """Call `on_orphaned(parent pid)` once, from a daemon thread, as soon as this process's parent is another one.

    Besides looking every `interval` seconds, it wakes when the reading end of a pipe on stdout or stderr closes
    (poll reports an error on the writing end), which is what the parent's death does to a worker's output pipe."""
    parent = os.getppid()
    poller = select.poll()
    for fd in _pipes():
        poller.register(fd, 0)  # no events asked for: POLLERR and POLLHUP are always reported

    def loop() -> None:
        fast_until = 0.0
        while os.getppid() == parent:
            wait = 0.05 if time.monotonic() < fast_until else interval
            events = poller.poll(wait * 1000)
            for fd, _ in events:
                poller.unregister(fd)
                fast_until = time.monotonic() + 2  # the parent is exiting: its pid changes in a moment
        on_orphaned(parent)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), name="desctune-watchdog",
                              daemon=True)
    thread.start()
    return thread


def stop(logger: logging.Logger | logging.LoggerAdapter, parent: int, grace: float = GRACE) -> None:
    """Quiet the dead pipe, say why in the run's log, make sure the API has it, then SIGTERM this process (Prefect:
    Crashed, hooks run); exit hard if that has not ended it within `grace` seconds."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in _pipes():
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass
    try:
        logger.error(message(parent))
    except Exception:
        pass
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def exit_with_worker(env: dict | None = None, interval: float = INTERVAL) -> threading.Thread | None:
    """Start the watchdog in a flow run started by a worker (DESCTUNE_EXIT_WITH_WORKER=1), once per process;
    returns its thread, or None when it is off."""
    global _watching
    if (os.environ if env is None else env).get(ENV, "").strip() != "1":
        return None
    with _lock:
        if _watching is None or not _watching.is_alive():
            from prefect import get_run_logger

            logger = get_run_logger()
            _watching = watch(lambda parent: stop(logger, parent), interval)
        return _watching
