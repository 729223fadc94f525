"""Progress lines at a steady cadence: the first, one per interval, the last; with rate, elapsed time and ETA."""

from __future__ import annotations

import logging


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_the_first_line_one_per_interval_and_the_last(caplog):
    from desctune.progress import Progress

    clock = Clock()
    logger = logging.getLogger("desctune.test-progress")
    progress = Progress(logger, "train step", 100, "step", every=20, clock=clock)
    logged = []
    with caplog.at_level(logging.INFO, logger="desctune.test-progress"):
        for step in range(1, 101):
            clock.now += 1.0  # one step a second
            logged.append(progress.update(step, f"loss {1 / step:.3f}", "400 tokens/s") and step)
    steps = [s for s in logged if s]
    assert steps == [1, 21, 41, 61, 81, 100]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "train step 1/100 (1%): loss 1.000, 400 tokens/s, elapsed 1s, ETA 1m39s"
    assert lines[2].startswith("train step 41/100 (41%): loss 0.024, 400 tokens/s, elapsed 41s, ETA 59s")
    assert lines[-1].endswith("elapsed 1m40s, done")


def test_a_heartbeat_fills_the_silence_of_work_that_outlasts_the_cadence():
    """A training step or validation pass longer than the cadence logs "still running" lines, each saying how long
    since the last line; a progress line in the meantime counts as a line."""
    import threading

    from desctune.progress import Heartbeat, Progress

    lines, arrived = [], threading.Event()

    class Catch(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            arrived.set()

    logger = logging.getLogger("desctune.test-heartbeat")
    logger.setLevel(logging.INFO)
    logger.addHandler(Catch())
    progress = Progress(logger, "train step", 46, "step", every=0.3)
    with Heartbeat(logger, lambda: "train step 7/46 running", every=0.3, progress=progress):
        progress.update(6, "loss 3.1")  # a progress line: the heartbeat waits the cadence after it
        arrived.clear()
        assert arrived.wait(timeout=60), "no heartbeat line within a minute"
    assert lines[0].startswith("train step 6/46 (13%)")
    assert lines[1].startswith("train step 7/46 running (elapsed ") and lines[1].endswith(" since the last line)")
    count = len(lines)  # every=0 (progress lines at every step): no heartbeat at all
    with Heartbeat(logger, lambda: "never", every=0):
        pass
    assert len(lines) == count
