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
