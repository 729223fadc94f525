"""One helper: a function over a stream of work items on a few worker processes, results in the items' order.

Threads are enough for Arrow's kernels, which let go of the GIL, but not for the Python repairs the cleaner runs on
some rows, nor for the Python around ingest's JSON parse; worker processes run those on every core (clean: a row group
a task; ingest: a byte range of the input a task). At most `in_flight` items are submitted ahead of the one being
consumed, so memory stays bounded whatever the input's size.

Workers are forked where the platform can: a spawned worker would import the caller's main module again, which breaks
any script without an `if __name__ == "__main__"` guard, and would pay the imports again. A fork copies the caller's
threads' locks too (Prefect runs threads); the workers only run Arrow, `re` and ftfy code, whose locks Python and
Arrow reset in a forked child, and they leave with `os._exit`, so no exit handler of the caller runs in them.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_worker() -> None:
    """Workers allocate with the C library's malloc: Arrow's default allocator (mimalloc) gives freed pages back to
    the system within milliseconds, so a worker that builds and frees tens of megabytes a task faulted them in anew
    each time, and a quarter of the workers' CPU time was the kernel's (measured on the data stages)."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def ordered_map(fn: Callable, items: Iterable[tuple], workers: int, in_flight: int | None = None) -> Iterator:
    """fn(*item) for each item, on `workers` worker processes, yielded in the items' order."""
    in_flight = in_flight or 2 * workers
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker)
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
