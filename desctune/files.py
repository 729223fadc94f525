"""Small file helpers every stage shares: atomic, durable writes, content hashes, and the sweep of what a killed
writer left.

A write goes to a temporary sibling, is fsynced, renamed into place, and the folder holding it is fsynced, so once a
helper returns its file or folder survives a power loss, not only a killed process."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_sha256(path: str | Path) -> str:
    """Hash of every file's relative name and content under a directory."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


TMP_NAME = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first, `root` last."""
    dirs = []
    for here, subdirs, files in os.walk(root):
        dirs.append(here)
        for name in files:
            fsync_path(os.path.join(here, name))
    for d in reversed(dirs):
        fsync_path(d)


def make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates so the new entries survive a power loss."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_path(d.parent)


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporaries that writers killed mid-write left in a stage folder (anywhere below it) and beside it;
    one whose writer (the pid in its name) still runs on this machine is left alone. Returns what was removed."""
    folder = Path(folder)
    found = list(folder.parent.glob(f".{folder.name}.tmp-*")) if folder.parent.is_dir() else []
    if folder.is_dir():
        found += list(folder.rglob(".*.tmp-*"))
    removed = []
    for p in found:
        m = TMP_NAME.match(p.name)
        if m is not None and _writer_alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def start_stage(out_dir: str | Path, logger: logging.Logger | logging.LoggerAdapter | None = None) -> Path:
    """What a stage does first: sweep the temporaries an interrupted run left in (or beside) its folder."""
    out_dir = Path(out_dir)
    removed = sweep_leftovers(out_dir)
    if removed:
        (logger or log).warning("removed %d temporary file(s) an interrupted write left in %s: %s", len(removed),
                                out_dir, ", ".join(p.name for p in removed[:3]) + (" …" if len(removed) > 3 else ""))
    return out_dir


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; if the block succeeds, fsync it, rename it into place and fsync
    the folder, so the file is on the disk when this returns."""
    final = Path(path)
    make_dirs(final.parent)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        if tmp.is_dir():
            fsync_tree(tmp)
        else:
            fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` as a whole when the block succeeds, with every file and folder
    in it and the rename fsynced first."""
    final = Path(path)
    make_dirs(final.parent)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = _tmp_sibling(final)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class HashingSink:
    """A file that a ParquetWriter writes to, hashed on the way, so an output is never read back only to hash it."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self._pos = 0
        self.closed = False

    def write(self, b) -> int:
        self._h.update(b)
        self._pos += len(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self._pos

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self.closed = True

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def __enter__(self) -> "HashingSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_parquet(df: pd.DataFrame | pa.Table, path: str | Path) -> str:
    """Write a Parquet file atomically and return its content hash (taken as it is written, not read back)."""
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(path) as tmp, HashingSink(tmp) as sink:
        pq.write_table(table, sink)
    return sink.hexdigest()


def stage_dir(artifacts_dir: str | Path, stage: str, *keys: str) -> Path:
    """Content-addressed output folder of a stage: runs with other inputs never share it."""
    key = hashlib.sha256("\x1f".join(keys).encode()).hexdigest()[:12]
    return Path(artifacts_dir) / "stages" / f"{stage}-{key}"
