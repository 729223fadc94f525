"""One helper: a function over a stream of work items on a few worker processes, results in the items' order.

Threads are enough for Arrow's kernels, which let go of the GIL, but not for the Python repairs the cleaner runs on
some rows, nor for the Python around ingest's JSON parse; worker processes run those on every core (clean: a row group
a task; ingest: a byte range of the input a task). At most `in_flight` items are submitted ahead of the one being
consumed, so memory stays bounded whatever the input's size.

Workers are forked where the platform can: a spawned worker would import the caller's main module again, which breaks
any script without an `if __name__ == "__main__"` guard, and would pay the imports again. A fork copies the caller's
threads' locks too (Prefect runs threads); the workers only run Arrow, `re` and ftfy code, whose locks Python and
Arrow reset in a forked child, and they leave with `os._exit`, so no exit handler of the caller runs in them.

Results come back through shared memory: a worker pickles its result with its Arrow and numpy buffers out of band,
writes those buffers to a file in /dev/shm and sends only the small rest through the pool's pipe; the caller maps the
file, removes it at once, and the result's arrays are views of the mapping: pickled whole, each result would be
copied four times on the way (into the pickle, into and out of the pipe, out of the pickle). Where the folder is
missing or full, results travel pickled whole.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import pickle
import re
import tempfile
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator

from desctune.files import _writer_alive


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_worker() -> None:
    """Workers allocate with the C library's malloc: Arrow's default allocator (mimalloc) gives freed pages back to
    the system within milliseconds, so a worker that builds and frees tens of megabytes a task would fault them in
    anew each time."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


# Results whose out-of-band buffers are smaller than this travel pickled whole (a file costs more than the copies).
SHARED_MIN_BYTES = 1 << 20
_ALIGN = 64  # each buffer starts on a 64-byte boundary of the file, as Arrow allocates them
_SHARED_NAME = re.compile(r"^desctune-result-(?P<pid>\d+)-[0-9a-f]{32}$")


def shared_dir() -> str:
    """Where results are handed over: /dev/shm (memory) where it can be written, else the temporary folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _pack(result, folder: str):
    """In a worker: the result pickled once with its buffers out of band, and those buffers either in a shared file
    ("shared", pickle, the file, their sizes) or, when small or when the file cannot be written, sent along through
    the pipe ("whole", pickle, None, their bytes)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    if sum(v.nbytes for v in views) >= SHARED_MIN_BYTES:
        path = os.path.join(folder, f"desctune-result-{os.getppid()}-{uuid.uuid4().hex}")
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:  # the owner's alone
                for v in views:
                    f.write(v)
                    f.write(bytes(-v.nbytes % _ALIGN))
            return "shared", data, path, [v.nbytes for v in views]
        except OSError:  # the folder is full (a container's small /dev/shm) or gone: send them the slow way
            _unlink(path)
    return "whole", data, None, [v.tobytes() for v in views]


def _unpack(packed):
    """In the caller: the worker's result; its shared file is mapped and removed before anything can fail."""
    kind, data, path, parts = packed
    if kind == "shared":
        try:
            with open(path, "rb") as f:
                view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        finally:
            _unlink(path)
        buffers, start = [], 0
        for n in parts:
            buffers.append(view[start : start + n])
            start += n + (-n % _ALIGN)
        parts = buffers
    return pickle.loads(data, buffers=parts)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _run(fn: Callable, folder: str, *item):
    return _pack(fn(*item), folder)


def sweep_shared(folder: str) -> list[str]:
    """Remove the result files left by runs whose caller was killed before it took them (its pid is in the name and
    no longer runs). Returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _SHARED_NAME.match(name)
        if m is None or _writer_alive(int(m["pid"])):
            continue
        _unlink(os.path.join(folder, name))
        removed.append(name)
    return removed


def ordered_map(fn: Callable, items: Iterable[tuple], workers: int, in_flight: int | None = None) -> Iterator:
    """fn(*item) for each item, on `workers` worker processes, yielded in the items' order."""
    in_flight = in_flight or 2 * workers
    folder = shared_dir()
    sweep_shared(folder)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(_run, fn, folder, *item))
            if len(pending) >= in_flight:
                yield _unpack(pending.popleft().result())
        while pending:
            yield _unpack(pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for future in pending:  # results nobody took (the caller stopped early or failed): remove their files
            if not future.cancelled() and future.exception() is None and future.result()[0] == "shared":
                _unlink(future.result()[2])
