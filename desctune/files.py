"""Small file helpers every stage shares: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it into place only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` as a whole when the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = _tmp_sibling(final)
            os.replace(final, old)
        os.replace(tmp, final)
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
