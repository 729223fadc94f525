"""The flow-run watchdog (desctune/watchdog.py) without Prefect: a process whose parent is killed -9 logs why and
sends itself SIGTERM within seconds; through a pipe to that parent it notices at once, without one by the parent pid;
a process that ignores SIGTERM still ends. The limits leave room for a loaded machine: "at once" is well under the
30 s look at the parent pid."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import ROOT
from tasks.watchdog import exit_with_worker, message

CHILD = textwrap.dedent("""
    import logging, os, signal, sys, time
    from pathlib import Path
    from tasks.watchdog import stop, watch

    out, interval, grace, on_term = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    def terminated(signum, frame):
        (out / "signal").write_text(str(signum))
        os._exit(0)
    signal.signal(signal.SIGTERM, terminated if on_term == "handle" else signal.SIG_IGN)
    logger = logging.getLogger("run")
    logger.addHandler(logging.StreamHandler(sys.stderr))  # into the pipe to the parent, like a run's console log
    logger.addHandler(logging.FileHandler(out / "log"))
    watch(lambda parent: stop(logger, parent, grace), interval)
    (out / "ready").write_text(str(os.getpid()))
    while True:  # a run that keeps writing to its (soon dead) parent
        try:
            print("step", flush=True)
        except OSError:
            pass
        time.sleep(0.05)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child, out, pipe = sys.argv[1], sys.argv[2], sys.argv[3] == "pipe"
    output = subprocess.PIPE if pipe else open(out + "/output", "w")
    subprocess.Popen([sys.executable, "-c", child, *sys.argv[2:3], *sys.argv[4:]], stdout=output, stderr=output,
                     start_new_session=True)
    time.sleep(600)
""")


def orphan(tmp_path, output: str, interval: float, grace: float, on_term: str) -> tuple[int, float]:
    """Start parent -> child (the watchdog in it), kill -9 the parent; (parent pid, seconds until the child ended)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path), output, str(interval), str(grace),
                               on_term], cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "ready").exists():
            assert parent.poll() is None and time.monotonic() < deadline, "the child never started its watchdog"
            time.sleep(0.05)
        child = psutil.Process(int((tmp_path / "ready").read_text()))
        time.sleep(0.3)
        assert child.is_running() and not (tmp_path / "log").read_text()  # a live parent is left alone
        parent.kill()
        parent.wait(10)
        killed = time.monotonic()
        try:
            child.wait(60)
        except psutil.TimeoutExpired:
            child.kill()
            pytest.fail("the child outlived its parent by 60 s")
        return parent.pid, time.monotonic() - killed
    finally:
        parent.kill()


def test_a_process_writing_into_a_pipe_to_its_killed_parent_logs_why_and_terminates_itself_at_once(tmp_path):
    parent, took = orphan(tmp_path, "pipe", interval=30, grace=30, on_term="handle")
    assert took < 20, took  # the pipe woke it, not the 30 s look at the parent pid
    assert (tmp_path / "signal").read_text() == "15"
    assert (tmp_path / "log").read_text().strip() == message(parent)


def test_without_a_pipe_it_notices_by_the_parent_pid_and_ends_a_process_that_ignores_sigterm(tmp_path):
    parent, took = orphan(tmp_path, "file", interval=0.2, grace=0.5, on_term="ignore")
    assert took < 20 and not (tmp_path / "signal").exists(), took
    assert (tmp_path / "log").read_text().strip() == message(parent)


def test_it_is_off_unless_a_worker_started_the_run():
    assert exit_with_worker({}) is None
    assert exit_with_worker({"DESCTUNE_EXIT_WITH_WORKER": "0"}) is None
