"""One writer per stage folder: two identical runs at once must not train into the same checkpoints.

Stage folders are content-addressed, so two runs with the same inputs share one. Atomic renames keep single files
safe, but training writes and rotates checkpoints over minutes; an OS file lock (released when its process dies,
so a killed run never leaves a stale lock) makes the second run wait, then reuse the result the first one recorded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from desctune.files import atomic_path, make_dirs

log = logging.getLogger(__name__)

RESULT = "result.json"


def exclusive(out_dir: str | Path, compute: Callable[[], dict]) -> dict:
    """Run `compute` for `out_dir` while holding its lock; a run that had to wait returns the holder's result."""
    out = Path(out_dir)
    make_dirs(out.parent)
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
        waited = False
    except Timeout:
        log.warning("another run is computing %s; waiting for it", out)
        lock.acquire()
        waited = True
    try:
        done = out / RESULT
        if waited and done.is_file():
            log.warning("reusing the result of the run that finished %s", out)
            return json.loads(done.read_text())
        result = compute()
        with atomic_path(done) as tmp:
            tmp.write_text(json.dumps(result))
        return result
    finally:
        lock.release()
