"""Ingest: stream a trn.json-style file into raw.parquet (line, uid, title, content) plus ingest_rejects.parquet.

Reads JSON Lines (.json/.jsonl, optionally gzipped; UTF-8 with or without BOM; LF or CRLF) or one top-level JSON
array, CSV (.csv/.tsv, optionally gzipped, with a header row), Parquet (.parquet), and a Hugging Face dataset (a
`save_to_disk` folder, or `hf://owner/name[:split]` where the network allows), all with the same field mapping
(data.uid_field, data.title_field, data.content_field) and the same rejects-with-reasons. Without a uid the record's
uid is derived from its title and content (`content_uid`), so it never depends on the record's position.

JSON Lines are read in fixed-size byte chunks so memory stays bounded whatever the file or one line holds; a large
plain file's chunks are parsed on one worker process per core, each reading its own byte range, while this process
only finds where the chunks end and writes. Each chunk goes through pyarrow's JSON reader; a chunk it cannot take
whole (a bad line, invalid UTF-8, a blank line, a non-string field) is bisected down to small blocks and only those
are parsed line by line, so one bad line costs little and every other record in the chunk is kept. Every line that
is not a usable record becomes a reject row (line number, uid if known, reason, raw excerpt): nothing is dropped
silently.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import logging
import mmap
import os
import threading
import zlib
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from desctune.config import DataConfig
from desctune.data.parallel import ordered_map, usable_cores
from desctune.errors import DataError
from desctune.files import HashingSink, atomic_path, dir_sha256, file_sha256, start_stage
from desctune.stages import stage_folder

log = logging.getLogger(__name__)

RAW_SCHEMA = pa.schema([("line", pa.int64()), ("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
REJECT_SCHEMA = pa.schema(
    [("line", pa.int64()), ("uid", pa.string()), ("reason", pa.string()), ("excerpt", pa.string())]
)
CHUNK_BYTES = 32 << 20
SMALL_BLOCK_LINES = 64
EXCERPT_CHARS = 200

REASONS = {
    "line_too_long": "the line is longer than data.max_line_bytes",
    "invalid_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line is not valid JSON",
    "malformed_csv": "the CSV row has more fields than the header",
    "not_object": "the line is valid JSON but not an object",
    "missing_title": "no title field, or it is null",
    "missing_content": "no content field, or it is null",
    "title_not_string": "the title is a number, list, object or boolean",
    "content_not_string": "the content is a number, list, object or boolean",
    "bad_uid": "the uid is a list, an object or binary",
    "field_too_long": "the title or content is longer than data.max_field_chars",
}
# The data settings that change what ingest writes (the file itself is keyed by its content hash).
INGEST_FIELDS = ("uid_field", "title_field", "content_field", "max_records", "max_field_chars", "max_line_bytes")
HF_PREFIX = "hf://"
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_BATCH_ROWS = 65_536
# From this size on, a plain JSON Lines file is parsed on worker processes (one per core); below, starting them costs
# more than it saves.
PARALLEL_MIN_BYTES = 4 * CHUNK_BYTES


# raw.parquet is an intermediate that clean reads once, in order: uncompressed, without dictionaries (the texts are
# nearly all distinct) or statistics it writes and reads several times faster than with zstd (its size is then close
# to the text's); the outputs users keep (clean.parquet, rejects) stay zstd.
RAW_PARQUET = {"compression": "none", "use_dictionary": False, "write_statistics": False}
# Rejects (here and in clean): zstd; a dictionary only for the reason, the one column whose values repeat (trying one
# on the uids and excerpts, nearly all distinct, cost more than the rest of the write); statistics on the short
# columns a reader may filter on.
REJECT_PARQUET = {"compression": "zstd", "use_dictionary": ["reason"], "write_statistics": ["line", "uid", "reason"]}




def content_uid(title: str, content: str) -> str:
    """The uid of a record that has none: a hash of its title and content, so it does not depend on where the record
    sits in the file (a `line-N` uid moved when records were inserted, and with it the record's split)."""
    digest = hashlib.blake2b(title.encode("utf-8", "surrogatepass"), digest_size=10)
    digest.update(b"\x00")
    digest.update(content.encode("utf-8", "surrogatepass"))
    return "h-" + digest.hexdigest()



def _excerpt(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text[:EXCERPT_CHARS]


class _Batch:
    """Columns of records and rejects gathered from one chunk, in line order."""

    def __init__(self) -> None:
        self.rec: dict[str, list] = {"line": [], "uid": [], "title": [], "content": []}
        self.rej: dict[str, list] = {"line": [], "uid": [], "reason": [], "excerpt": []}

    def reject(self, line: int, uid: str | None, reason: str, raw: bytes | str) -> None:
        for k, v in zip(self.rej, (line, uid, reason, _excerpt(raw))):
            self.rej[k].append(v)

    def record(self, line: int, uid: str, title: str, content: str) -> None:
        for k, v in zip(self.rec, (line, uid, title, content)):
            self.rec[k].append(v)


def _check_record(obj, lineno: int, raw: bytes | str, data: DataConfig, out: _Batch) -> None:
    """Validate one decoded JSON value and add it to `out` as a record or a reject."""
    if not isinstance(obj, dict):
        return out.reject(lineno, None, "not_object", raw)
    uid = obj.get(data.uid_field)
    if isinstance(uid, (dict, list)):
        return out.reject(lineno, None, "bad_uid", raw)
    uid = None if uid is None else str(uid)
    title, content = obj.get(data.title_field), obj.get(data.content_field)
    if title is None:
        return out.reject(lineno, uid, "missing_title", raw)
    if not isinstance(title, str):
        return out.reject(lineno, uid, "title_not_string", raw)
    if content is None:
        return out.reject(lineno, uid, "missing_content", raw)
    if not isinstance(content, str):
        return out.reject(lineno, uid, "content_not_string", raw)
    if len(title) > data.max_field_chars or len(content) > data.max_field_chars:
        return out.reject(lineno, uid, "field_too_long", raw)
    out.record(lineno, content_uid(title, content) if uid is None else uid, title, content)


def _parse_lines(block: bytes, first_line: int, data: DataConfig, out: _Batch) -> None:
    """The slow, exact path: one line at a time."""
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        lineno = first_line + i
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            out.reject(lineno, None, "invalid_utf8", raw)
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out.reject(lineno, None, "malformed_json", raw)
            continue
        _check_record(obj, lineno, raw, data, out)


def _line_starts(block: bytes, rows: list[int]) -> dict[int, tuple[int, int]]:
    """Byte spans of the given 0-based line indexes of `block` (only computed for the few rejected rows)."""
    wanted, spans, start = set(rows), {}, 0
    for i in range(max(rows) + 1):
        end = block.find(b"\n", start)
        end = len(block) if end < 0 else end
        if i in wanted:
            spans[i] = (start, end)
        start = end + 1
    return spans


def _valid_utf8(block: bytes) -> bool:
    """Whether `block` is valid UTF-8, checked by Arrow in place: `bytes.decode` made a str of up to 4x the block
    only to throw it away, and that str was the largest allocation of ingest."""
    offsets = pa.array([0, len(block)], pa.int64()).buffers()[1]
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(block)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _parse_fast(block: bytes, first_line: int, nlines: int, data: DataConfig, threads: bool = True) -> pa.Table | None:
    """pyarrow's JSON reader (multithreaded unless `threads` is false: in a worker process, one per core, more threads
    only contend); None when the block needs the exact path."""
    if not block.isascii() and not _valid_utf8(block):
        return None
    for uid_type in (pa.string(), pa.int64()):
        schema = pa.schema(
            [(data.uid_field, uid_type), (data.title_field, pa.string()), (data.content_field, pa.string())]
        )
        try:
            table = pj.read_json(
                io.BytesIO(block),
                read_options=pj.ReadOptions(use_threads=threads, block_size=max(1 << 20, len(block) // 8 + 1)),
                parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            if f"Column(/{data.uid_field})" in str(exc) and uid_type == pa.string():
                continue
            return None
        if table.num_rows != nlines:
            return None
        if uid_type != pa.string():
            i = table.schema.get_field_index(data.uid_field)
            table = table.set_column(i, data.uid_field, pc.cast(table.column(i), pa.string()))
        return table
    return None


def _fast_to_batch(table: pa.Table, block: bytes, first_line: int, data: DataConfig) -> tuple[pa.Table, pa.Table]:
    """Split a parsed block into records and rejects (null fields, over-long fields) without a Python loop."""
    n = table.num_rows
    lines = pa.array(np.arange(first_line, first_line + n, dtype=np.int64))
    fields = (data.uid_field, data.title_field, data.content_field)
    uid, title, content = (table.column(c).combine_chunks() for c in fields)
    bad = pc.or_(pc.is_null(title), pc.is_null(content))
    cap = data.max_field_chars
    for text in (title, content):  # a text within cap bytes is within cap characters: count characters only then
        if text.null_count < len(text) and pc.max(pc.binary_length(text)).as_py() > cap:
            bad = pc.or_(bad, pc.fill_null(pc.greater(pc.utf8_length(text), cap), False))
    any_bad = pc.any(bad).as_py()
    records = pa.table({"line": lines, "uid": uid, "title": title, "content": content})
    records = _fill_uids(records.filter(pc.invert(bad)) if any_bad else records)
    if not any_bad:
        return records, REJECT_SCHEMA.empty_table()
    idx = pc.indices_nonzero(bad).to_pylist()
    spans = _line_starts(block, idx)
    out = _Batch()
    titles, contents, uids = title.take(idx).to_pylist(), content.take(idx).to_pylist(), uid.take(idx).to_pylist()
    for k, i in enumerate(idx):
        reason = ("missing_title" if titles[k] is None else "missing_content" if contents[k] is None
                  else "field_too_long")
        s, e = spans[i]
        out.reject(first_line + i, uids[k], reason, block[s : min(e, s + 4 * EXCERPT_CHARS)].rstrip(b"\r"))
    return records, pa.table(out.rej, schema=REJECT_SCHEMA)


def _fill_uids(records: pa.Table) -> pa.Table:
    """Give the records without a uid their content-derived one (Python only for those rows)."""
    uid = records.column("uid").combine_chunks()
    if not uid.null_count:
        return records
    missing = pc.is_null(uid)
    rows = records.filter(missing)
    derived = [content_uid(t, c) for t, c in zip(rows.column("title").to_pylist(), rows.column("content").to_pylist())]
    uid = pc.replace_with_mask(uid, missing, pa.array(derived, pa.string()))
    return records.set_column(records.schema.get_field_index("uid"), "uid", uid)


def _parse_block(
    block: bytes, first_line: int, data: DataConfig, nlines: int | None = None, threads: bool = True
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Parse a block of whole lines (ending in b'\\n'): fast path, else bisect, else line by line."""
    nlines = block.count(b"\n") if nlines is None else nlines
    table = _parse_fast(block, first_line, nlines, data, threads)
    if table is not None:
        yield _fast_to_batch(table, block, first_line, data)
        return
    if nlines <= SMALL_BLOCK_LINES:
        out = _Batch()
        _parse_lines(block, first_line, data, out)
        yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA)
        return
    mid = block.find(b"\n", len(block) // 2)
    if mid < 0 or mid == len(block) - 1:
        mid = block.rfind(b"\n", 0, len(block) - 1)
    left, right = block[: mid + 1], block[mid + 1 :]
    yield from _parse_block(left, first_line, data, threads=threads)
    yield from _parse_block(right, first_line + left.count(b"\n"), data, threads=threads)


def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read(f, n: int, path: Path) -> bytes:
    try:
        return f.read(n)
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (it ends before the end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None


def _first_bytes(f, path: Path) -> tuple[bytes, str]:
    """Read past a BOM and leading whitespace; return the buffered start and the shape ('lines' or 'array')."""
    head = _read(f, 4096, path)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16; save it as UTF-8 JSON Lines")
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:]
    while head.strip() == b"":
        more = _read(f, 1 << 20, path)
        if not more:
            raise DataError(f"{path}: the file is empty")
        head = more
    shape = "array" if head.lstrip()[:1] == b"[" else "lines"
    return head, shape


def source_kind(path: str | Path) -> str:
    """'hf' (hub id), 'hf-folder' (a `save_to_disk` folder), 'csv', 'parquet' or 'json', from the name or the magic."""
    text = str(path)
    if text.startswith(HF_PREFIX):
        return "hf"
    p = Path(text)
    if p.is_dir():
        return "hf-folder"
    name = p.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"PAR1":
                return "parquet"
    return "json"


def check_source(path: str | Path) -> None:
    """A one-line DataError when the input cannot be there at all (a missing file or folder)."""
    kind = source_kind(path)
    if kind == "hf":
        return
    p = Path(path)
    if kind == "hf-folder":
        if not any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DataError(f"{p}: a folder, but not a Hugging Face dataset saved with save_to_disk")
        return
    if not p.is_file():
        raise DataError(f"input file not found: {p}")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")


_FINGERPRINTS: dict[tuple, Future] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def _file_key(path: str | Path, st: os.stat_result) -> tuple:
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def fingerprint_under_way(path: str | Path, st: os.stat_result, sha256: Future) -> None:
    """Let `source_fingerprint` take a file's sha256 that a caller started computing when the file was as `st` says
    (`desctune prepare` starts it before its imports)."""
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS.setdefault(_file_key(path, st), sha256)


def source_fingerprint(path: str | Path) -> str:
    """A hash of the input's content: the file's sha256, a folder's files, or a hub dataset's own fingerprint.

    A file's hash is remembered for this process by (path, size, mtime), and a second caller waits for the first, so
    `desctune prepare` can start hashing on a thread while Prefect starts and the fingerprint task picks it up."""
    check_source(path)
    kind = source_kind(path)
    if kind == "hf":
        ds = _load_hf(str(path))
        return hashlib.sha256(f"{path}\x1f{ds._fingerprint}".encode()).hexdigest()
    if kind == "hf-folder":
        return dir_sha256(path)
    key = _file_key(path, os.stat(path))
    with _FINGERPRINTS_LOCK:
        future, owner = _FINGERPRINTS.get(key), False
        if future is None:
            future = _FINGERPRINTS[key] = Future()
            owner = True
    if owner:
        try:
            # 64 MiB a read: each read takes the GIL back, and beside a busy thread (the command importing, Prefect's
            # engine) that waits up to a switch interval; in 1 MiB reads the 1.3 GB file took 14 s beside one, not 2.
            future.set_result(file_sha256(path, chunk=64 << 20))
        except BaseException as exc:
            with _FINGERPRINTS_LOCK:
                _FINGERPRINTS.pop(key, None)
            future.set_exception(exc)
    return future.result()


def _column(table: pa.Table, name: str, n: int) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(n, pa.string())
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _as_string(arr: pa.Array) -> tuple[pa.Array, bool]:
    """(the column as strings, whether its type was a string type); numbers and booleans become text."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return arr.cast(pa.string()), True
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string()), True
    if pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        return arr.cast(pa.string()), True
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return arr.cast(pa.string()), False
    return pa.nulls(len(arr), pa.string()), False


def _check_table(table: pa.Table, first_line: int, data: DataConfig) -> tuple[pa.Table, pa.Table]:
    """The rules of `_check_record` for a whole Arrow table (Parquet, Hugging Face): columns, not rows, in Python."""
    n = table.num_rows
    uid_raw, title_raw, content_raw = (_column(table, f, n) for f in (data.uid_field, data.title_field,
                                                                     data.content_field))
    uid, uid_ok = _as_string(uid_raw)
    title, title_str = _as_string(title_raw)
    content, content_str = _as_string(content_raw)
    reason = pa.nulls(n, pa.string())
    cap = data.max_field_chars
    checks = [
        (pc.invert(pc.is_null(uid_raw)) if not uid_ok and not pa.types.is_integer(uid_raw.type) else None, "bad_uid"),
        (pc.is_null(title_raw), "missing_title"),
        (None if title_str else pa.array([True] * n), "title_not_string"),
        (pc.is_null(content_raw), "missing_content"),
        (None if content_str else pa.array([True] * n), "content_not_string"),
        (pc.or_(pc.greater(pc.utf8_length(title), cap), pc.greater(pc.utf8_length(content), cap)), "field_too_long"),
    ]
    for mask, name in checks:
        if mask is not None:
            reason = pc.if_else(pc.and_(pc.is_null(reason), pc.fill_null(mask, False)), name, reason)
    if pa.types.is_integer(uid_raw.type):
        uid_ok = True
    if not uid_ok:
        uid = pa.nulls(n, pa.string())
    lines = pa.array(range(first_line, first_line + n), pa.int64())
    ok = pc.is_null(reason)
    records = _fill_uids(pa.table({"line": lines, "uid": uid, "title": title, "content": content}).filter(ok))
    if pc.all(ok).as_py():
        return records, REJECT_SCHEMA.empty_table()
    idx = pc.indices_nonzero(pc.invert(ok))
    bad_rows = table.take(idx).to_pylist()
    excerpts = [_excerpt(orjson.dumps(row, default=str)) for row in bad_rows]
    rejects = pa.table(
        {"line": lines.take(idx), "uid": uid.take(idx), "reason": reason.take(idx), "excerpt": excerpts},
        schema=REJECT_SCHEMA,
    )
    return records, rejects


def _limited(batches, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """Check each Arrow batch in turn, numbering rows from 1 and stopping at data.max_records."""
    done, limit = 0, data.max_records
    for batch in batches:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        if limit is not None:
            table = table.slice(0, limit - done)
        if table.num_rows:
            records, rejects = _check_table(table, done + 1, data)
            done += table.num_rows
            yield records, rejects, done
        if limit is not None and done >= limit:
            return


def _iter_parquet(path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    wanted = [f for f in (data.uid_field, data.title_field, data.content_field) if f in pf.schema_arrow.names]
    yield from _limited(pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=wanted), data)


def _load_hf(path: str):
    """A `datasets.Dataset` from a save_to_disk folder or `hf://owner/name[:split]` (the train split by default)."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the `datasets` library: pip install datasets") from None
    try:
        if path.startswith(HF_PREFIX):
            name, _, split = path[len(HF_PREFIX):].partition(":")
            ds = datasets.load_dataset(name, split=split or None)
        else:
            ds = datasets.load_from_disk(path)
            split = ""
    except Exception as exc:  # the library raises many types (network, missing files, bad names)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: cannot load the Hugging Face dataset ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split:
            names = ", ".join(ds)
            raise DataError(f"{path}: no split {split!r} (splits: {names})")
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: several splits ({', '.join(ds)}); name one as hf://owner/name:split")
    return ds


def _iter_hf(path: str, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    ds = _load_hf(path)
    wanted = [f for f in (data.uid_field, data.title_field, data.content_field) if f in ds.column_names]
    ds = ds.select_columns(wanted).with_format("arrow")
    yield from _limited(ds.iter(batch_size=TABLE_BATCH_ROWS), data)


def _iter_csv(path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """CSV with a header row, rows checked like JSON objects; `line` is the row's first physical line (header = 1)."""
    delimiter = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
    csv.field_size_limit(max(data.max_line_bytes, 1 << 20))
    out, limit, rows = _Batch(), data.max_records, 0
    with _open(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        prev = 0
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty")
            prev = reader.line_num
            width = len(header)
            for row in reader:
                lineno, prev = prev + 1, reader.line_num
                if not row:
                    continue
                rows += 1
                raw_text = delimiter.join(row)
                if len(row) > width:
                    out.reject(lineno, None, "malformed_csv", raw_text)
                else:
                    # An empty cell is CSV's way of saying "missing", as pandas reads it.
                    _check_record({k: v or None for k, v in zip(header, row)}, lineno, raw_text, data, out)
                if len(out.rec["line"]) + len(out.rej["line"]) >= TABLE_BATCH_ROWS:
                    yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), prev
                    out = _Batch()
                if limit is not None and rows >= limit:
                    break
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc.reason} after line {prev})") from None
        except csv.Error as exc:
            raise DataError(f"{path}: malformed CSV after line {prev} ({exc})") from None
    yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), prev


def iter_chunks(path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """Yield (records, rejects, lines_read_so_far) per chunk of the input, whatever its format."""
    kind = source_kind(path)
    if kind in ("hf", "hf-folder"):
        yield from _iter_hf(str(path), data)
        return
    if kind == "csv":
        yield from _iter_csv(Path(path), data)
        return
    if kind == "parquet":
        yield from _iter_parquet(Path(path), data)
        return
    yield from _iter_json(Path(path), data)


def _iter_json(path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """JSON Lines in byte chunks through the fast path, or one JSON array element by element."""
    limit = data.max_records
    read_size = min(CHUNK_BYTES, data.max_line_bytes)
    with _open(path) as f:
        buf, shape = _first_bytes(f, path)
        if shape == "array":
            yield from _iter_array(f, buf, path, data)
            return
        if _parallel(f, data):
            yield from _iter_lines_parallel(path, f.tell() - len(buf), f.tell(), data)
            return
        line_no, eof = 1, False
        while not eof:
            more = _read(f, read_size, path)
            eof = not more
            buf += more
            if eof and buf and not buf.endswith(b"\n"):
                buf += b"\n"
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) > data.max_line_bytes:
                    buf = yield from _skip_long_line(f, buf, line_no, path)
                    line_no += 1
                continue
            first_end = buf.find(b"\n")
            if first_end > data.max_line_bytes:
                rej = _Batch()
                rej.reject(line_no, None, "line_too_long", buf[: 4 * EXCERPT_CHARS])
                yield RAW_SCHEMA.empty_table(), pa.table(rej.rej, schema=REJECT_SCHEMA), line_no
                line_no += 1
                buf = buf[first_end + 1 :]
                continue
            block, buf = buf[:cut], buf[cut:]
            if limit is not None and line_no - 1 + block.count(b"\n") > limit:
                block = _first_lines(block, limit - line_no + 1)
                eof = True
            n = block.count(b"\n")
            for records, rejects in _parse_block(block, line_no, data, n):
                yield records, rejects, line_no - 1 + n
            line_no += n
            if limit is not None and line_no - 1 >= limit:
                return


def _parallel(f, data: DataConfig) -> bool:
    """Whether the JSON Lines file open as `f` (past `_first_bytes`) is parsed on worker processes: a plain file
    (a gzipped one's offsets are not the file's) of at least PARALLEL_MIN_BYTES, read whole, on more than one core."""
    if isinstance(f, gzip.GzipFile) or data.max_records is not None or usable_cores() < 2:
        return False
    return os.fstat(f.fileno()).st_size >= PARALLEL_MIN_BYTES


def _line_spans(path: Path, start: int, read_end: int, data: DataConfig) -> Iterator[tuple[str, int, int]]:
    """The chunks `_iter_json`'s serial loop makes, as byte spans found without reading the file through (mmap):
    ("lines", begin, end) for a block of whole lines, ("long", begin, begin) for a line longer than
    data.max_line_bytes (only its start is read, for the excerpt).
    The spans mirror that loop read by read (`start`: where its buffer begins, `read_end`: its file position), so both
    paths write the same raw.parquet."""
    window, limit, skip = min(CHUNK_BYTES, data.max_line_bytes), data.max_line_bytes, 1 << 20
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size, pos = len(mm), start
        while True:
            eof, read_end = read_end >= size, min(read_end + window, size)
            if eof and pos >= size:
                return
            cut = size if eof else mm.rfind(b"\n", pos, read_end) + 1
            if cut <= pos:  # no whole line in the buffer yet
                if read_end - pos > limit:
                    yield "long", pos, pos
                    nl = mm.find(b"\n", read_end)  # the serial loop skips on in 1 MiB reads
                    if nl < 0:
                        pos = read_end = size
                    else:
                        pos, read_end = nl + 1, min(read_end + ((nl - read_end) // skip + 1) * skip, size)
                continue
            first = mm.find(b"\n", pos, cut)
            first = cut if first < 0 else first
            if first - pos > limit:
                yield "long", pos, pos
                pos = first + 1
                continue
            yield "lines", pos, cut
            pos = cut


def _parse_span(path: str, kind: str, begin: int, end: int, data: DataConfig) -> tuple[list, int]:
    """What a worker process does with one span of `_line_spans`: read it and parse it, numbering its lines from 1;
    returns the (records, rejects) pairs and the number of lines."""
    with open(path, "rb") as f:
        if kind == "long":
            out = _Batch()
            out.reject(1, None, "line_too_long", os.pread(f.fileno(), 4 * EXCERPT_CHARS, begin))
            return [(RAW_SCHEMA.empty_table(), pa.table(out.rej, schema=REJECT_SCHEMA))], 1
        parts = []
        while begin < end:
            parts.append(os.pread(f.fileno(), min(end - begin, 1 << 30), begin))
            begin += len(parts[-1])
    block = b"".join(parts) if len(parts) > 1 else parts[0]
    if not block.endswith(b"\n"):  # the last line of a file without a final newline
        block += b"\n"
    n = block.count(b"\n")
    return list(_parse_block(block, 1, data, n, threads=False)), n


def _shift_lines(table: pa.Table, by: int) -> pa.Table:
    if not table.num_rows or not by:
        return table
    i = table.schema.get_field_index("line")
    return table.set_column(i, "line", pc.add(table.column(i), pa.scalar(by, pa.int64())))


def _iter_lines_parallel(
    path: Path, start: int, read_end: int, data: DataConfig
) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """JSON Lines from `start` on, parsed on worker processes in file order; this process numbers the lines."""
    spans = ((str(path), kind, begin, end, data) for kind, begin, end in _line_spans(path, start, read_end, data))
    before = 0
    for pairs, n in ordered_map(_parse_span, spans, usable_cores()):
        for records, rejects in pairs:
            yield _shift_lines(records, before), _shift_lines(rejects, before), before + n
        before += n


def _first_lines(block: bytes, n: int) -> bytes:
    pos = -1
    for _ in range(n):
        pos = block.find(b"\n", pos + 1)
    return block[: pos + 1]


def _skip_long_line(f, buf: bytes, line_no: int, path: Path):
    """Reject the over-long line starting `buf` and discard it without holding it; return what follows it."""
    rej = _Batch()
    rej.reject(line_no, None, "line_too_long", buf[: 4 * EXCERPT_CHARS])
    yield RAW_SCHEMA.empty_table(), pa.table(rej.rej, schema=REJECT_SCHEMA), line_no
    while True:
        chunk = _read(f, 1 << 20, path)
        if not chunk:
            return b""
        nl = chunk.find(b"\n")
        if nl >= 0:
            return chunk[nl + 1 :]


def _iter_array(f, head: bytes, path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """One top-level JSON array, decoded element by element (the 'line' column is the element's 1-based index)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    json_dec = json.JSONDecoder()

    def decode(b: bytes, final: bool = False) -> str:
        try:
            return decoder.decode(b, final)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc.reason} in the JSON array)") from None

    text = decode(head)
    pos = text.index("[") + 1
    element, eof, out = 0, False, _Batch()
    limit = data.max_records
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            break
        try:
            obj, end = json_dec.raw_decode(text, pos) if pos < len(text) else (None, -1)
        except json.JSONDecodeError as exc:
            obj, end, err = None, -1, exc
        else:
            err = None
        if end < 0 or (end == len(text) and not eof):
            if eof:
                where = f": {err.msg}" if err else ""
                raise DataError(f"{path}: the JSON array is malformed or truncated at element {element + 1}{where}")
            if len(text) - pos > data.max_line_bytes:
                raise DataError(f"{path}: JSON array element {element + 1} is longer than data.max_line_bytes")
            more = _read(f, CHUNK_BYTES, path)
            eof = not more
            text = text[pos:] + decode(more, eof)
            pos = 0
            continue
        element += 1
        _check_record(obj, element, text[pos:end], data, out)
        pos = end
        if len(out.rec["line"]) + len(out.rej["line"]) >= 50_000:
            yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), element
            out = _Batch()
        if limit is not None and element >= limit:
            break
    yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), element


def ingest_folder(artifacts_dir: str | Path, data: DataConfig, input_sha256: str) -> Path:
    """The ingest stage's folder for this input and these settings (what the ingest task and `ingest_early` use)."""
    return stage_folder(artifacts_dir, "ingest", input_sha256, data.subset(INGEST_FIELDS))


# `desctune prepare` starts ingest on a thread as soon as it has read its arguments, while it imports Prefect (and,
# for a flow run, Prefect's server starts); the flow's ingest task, or the command's own call, then takes that run's
# result instead of reading the input again. Entries are keyed by the data settings and taken once.
_EARLY: dict[str, Future] = {}
_EARLY_LOCK = threading.Lock()


def ingest_early(data: DataConfig, folder_for: Callable[[str], Path | None]) -> None:
    """Start ingesting `data` on a thread now. `folder_for(input sha256)` names the stage folder, or None when there
    is nothing to do (the stage is there already). The next `ingest_file` call for the same settings in this process
    waits for this run and takes its result (or its error) when it wrote the folder that call asks for."""
    future: Future = Future()
    with _EARLY_LOCK:
        _EARLY[data.model_dump_json()] = future

    def run() -> None:
        try:
            folder = folder_for(source_fingerprint(data.path))
            future.set_result(None if folder is None else (Path(folder), _ingest(data, Path(folder))))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller that takes the result
            future.set_exception(exc)

    threading.Thread(target=run, name="desctune-early-ingest", daemon=True).start()


def ingest_file(data: DataConfig, out_dir: Path) -> dict:
    """Stream `data.path` into out_dir/raw.parquet and out_dir/ingest_rejects.parquet; return counts and hashes.
    Takes the result of an `ingest_early` run of the same settings into the same folder when there is one."""
    with _EARLY_LOCK:
        early = _EARLY.pop(data.model_dump_json(), None)
    if early is not None:
        done = early.result()
        if done is not None and done[0] == Path(out_dir):
            log.info("ingest: took the run started early (%s)", out_dir)
            return done[1]
    return _ingest(data, Path(out_dir))


def _ingest(data: DataConfig, out_dir: Path) -> dict:
    check_source(data.path)
    path = data.path if source_kind(data.path) == "hf" else Path(data.path)
    out_dir = start_stage(out_dir, log)
    raw_path, rej_path = out_dir / "raw.parquet", out_dir / "ingest_rejects.parquet"
    records = lines_read = 0
    reasons: Counter[str] = Counter()
    first_rejects: list[str] = []
    with atomic_path(raw_path) as raw_tmp, atomic_path(rej_path) as rej_tmp:
        raw_sink, rej_sink = HashingSink(raw_tmp), HashingSink(rej_tmp)
        with raw_sink, rej_sink, pq.ParquetWriter(raw_sink, RAW_SCHEMA, **RAW_PARQUET) as raw_w, pq.ParquetWriter(
            rej_sink, REJECT_SCHEMA, **REJECT_PARQUET
        ) as rej_w:
            for recs, rejs, lines_read in iter_chunks(path, data):
                if recs.num_rows:
                    raw_w.write_table(recs, row_group_size=1 << 20)
                    records += recs.num_rows
                if rejs.num_rows:
                    rej_w.write_table(rejs)
                    reasons.update(rejs.column("reason").to_pylist())
                    if len(first_rejects) < 3:
                        first_rejects.extend(rejs.column("excerpt").to_pylist()[:3])
        if records == 0:
            raise DataError(_no_records_message(path, lines_read, reasons, first_rejects))
    pa.default_memory_pool().release_unused()  # clean runs next, often in this process
    rejected = sum(reasons.values())
    log.info("ingest %s: %d lines, %d records, %d rejected %s", path, lines_read, records, rejected, dict(reasons))
    return {
        "path": str(raw_path),
        "sha256": raw_sink.hexdigest(),
        "rejects_path": str(rej_path),
        "rejects_sha256": rej_sink.hexdigest(),
        "input_path": str(path),
        "lines_read": lines_read,
        "records": records,
        "rejected": rejected,
        "by_reason": dict(sorted(reasons.items())),
    }


def _no_records_message(path: Path, lines: int, reasons: Counter, excerpts: list[str]) -> str:
    if not reasons:
        return f"{path}: no records (only blank lines)"
    reason, count = reasons.most_common(1)[0]
    what = {
        "invalid_utf8": "not decodable as UTF-8",
        "malformed_json": "not JSON Lines (nor one JSON array)",
        "not_object": "not JSON Lines of objects",
    }.get(reason, f"no usable record ({reason}: {count} of {lines} lines)")
    first = excerpts[0][:60].replace("\n", " ") if excerpts else ""
    hint = " - check data.uid_field/title_field/content_field" if reason.startswith(("missing_", "bad_uid")) else ""
    return f"{path}: {what}; first line starts {first!r}{hint}"

