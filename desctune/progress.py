"""Progress lines at a steady cadence for long stages (training, generation): the first, then one at most every
`every` seconds, and the last, each with the rate and the time left, so a run's log never goes quiet for minutes."""

from __future__ import annotations

import logging
import time


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`update(done, detail)` logs "WHAT done/total (pct%): detail, rate, elapsed, ETA" when the cadence allows."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str, total: int, unit: str,
                 every: float = 20.0, start: int = 0, clock=time.monotonic):
        self.logger, self.what, self.total, self.unit, self.every = logger, what, max(total, 1), unit, every
        self.clock, self.start = clock, start
        self.t0 = self.last = clock()
        self.logged = False

    def due(self, done: int) -> bool:
        return not self.logged or done >= self.total or self.clock() - self.last >= self.every

    def update(self, done: int, detail: str = "", rate: str | None = None) -> bool:
        """Log a line if one is due; True when it did. `rate` replaces the default "N <unit>s/s"."""
        if not self.due(done):
            return False
        now = self.clock()
        elapsed = now - self.t0
        since = done - self.start
        per_s = since / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / per_s if per_s > 0 else None
        parts = [p for p in (detail, rate or f"{per_s:.2f} {self.unit}s/s", f"elapsed {duration(elapsed)}",
                             "done" if done >= self.total else f"ETA {duration(eta) if eta is not None else '?'}") if p]
        self.logger.info("%s %d/%d (%d%%): %s", self.what, done, self.total, 100 * done // self.total, ", ".join(parts))
        self.last, self.logged = now, True
        return True


class Heartbeat:
    """A line every `every` seconds while nothing else is logged: for work whose units (a training step on a slow
    CPU, a validation pass) can each outlast the cadence. `still()` says what is running; `progress`, when given, is
    the Progress whose lines count as lines (the heartbeat waits `every` after its last one). Use as a context."""

    def __init__(self, logger, still, every: float = 20.0, progress: Progress | None = None, clock=time.monotonic):
        import threading

        self.logger, self.still, self.every, self.progress, self.clock = logger, still, every, progress, clock
        self.t0 = self.last = clock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="desctune-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(min(1.0, self.every)):
            last = max(self.last, self.progress.last if self.progress is not None else self.last)
            now = self.clock()
            if now - last >= self.every:
                self.logger.info("%s (elapsed %s, %s since the last line)", self.still(), duration(now - self.t0),
                                 duration(now - last))
                self.last = now

    def __enter__(self) -> "Heartbeat":
        if self.every > 0:  # 0: progress lines at every step, nothing to fill
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
