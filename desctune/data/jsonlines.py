"""JSON Lines (optionally gzipped; UTF-8 with or without BOM; LF or CRLF) and one top-level JSON array.

JSON Lines are read in fixed-size byte chunks so memory stays bounded whatever the file or one line holds. Each chunk
goes through pyarrow's JSON reader; a chunk it cannot take whole (a bad line, invalid UTF-8, a blank line, a
non-string field) is bisected down to small blocks and only those are parsed line by line, so one bad line costs
little and every other record in the chunk is kept.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from desctune.config import DataConfig
from desctune.data.records import EXCERPT_CHARS, RAW_SCHEMA, REJECT_SCHEMA, Batch, check_record, fill_uids
from desctune.errors import DataError

CHUNK_BYTES = 32 << 20
SMALL_BLOCK_LINES = 64


def _parse_lines(block: bytes, first_line: int, data: DataConfig, out: Batch) -> None:
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
        check_record(obj, lineno, raw, data, out)


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
    """Whether `block` is valid UTF-8, checked by Arrow in place (`bytes.decode` would make a str of up to 4x the
    block only to throw it away)."""
    offsets = pa.array([0, len(block)], pa.int64()).buffers()[1]
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(block)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _parse_fast(block: bytes, first_line: int, nlines: int, data: DataConfig) -> pa.Table | None:
    """pyarrow's JSON reader, multithreaded; None when the block needs the exact path."""
    if not block.isascii() and not _valid_utf8(block):
        return None
    for uid_type in (pa.string(), pa.int64()):
        schema = pa.schema(
            [(data.uid_field, uid_type), (data.title_field, pa.string()), (data.content_field, pa.string())]
        )
        try:
            table = pj.read_json(
                io.BytesIO(block),
                read_options=pj.ReadOptions(use_threads=True, block_size=max(1 << 20, len(block) // 8 + 1)),
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
    records = fill_uids(records.filter(pc.invert(bad)) if any_bad else records)
    if not any_bad:
        return records, REJECT_SCHEMA.empty_table()
    idx = pc.indices_nonzero(bad).to_pylist()
    spans = _line_starts(block, idx)
    out = Batch()
    titles, contents, uids = title.take(idx).to_pylist(), content.take(idx).to_pylist(), uid.take(idx).to_pylist()
    for k, i in enumerate(idx):
        reason = ("missing_title" if titles[k] is None else "missing_content" if contents[k] is None
                  else "field_too_long")
        s, e = spans[i]
        out.reject(first_line + i, uids[k], reason, block[s : min(e, s + 4 * EXCERPT_CHARS)].rstrip(b"\r"))
    return records, pa.table(out.rej, schema=REJECT_SCHEMA)


def _parse_block(
    block: bytes, first_line: int, data: DataConfig, nlines: int | None = None
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Parse a block of whole lines (ending in b'\\n'): fast path, else bisect, else line by line."""
    nlines = block.count(b"\n") if nlines is None else nlines
    table = _parse_fast(block, first_line, nlines, data)
    if table is not None:
        yield _fast_to_batch(table, block, first_line, data)
        return
    if nlines <= SMALL_BLOCK_LINES:
        out = Batch()
        _parse_lines(block, first_line, data, out)
        yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA)
        return
    mid = block.find(b"\n", len(block) // 2)
    if mid < 0 or mid == len(block) - 1:
        mid = block.rfind(b"\n", 0, len(block) - 1)
    left, right = block[: mid + 1], block[mid + 1 :]
    yield from _parse_block(left, first_line, data)
    yield from _parse_block(right, first_line + left.count(b"\n"), data)


def open_input(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_input(f, n: int, path: Path) -> bytes:
    try:
        return f.read(n)
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (it ends before the end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None


def first_bytes(f, path: Path) -> tuple[bytes, str]:
    """Read past a BOM and leading whitespace; return the buffered start and the shape ('lines' or 'array')."""
    head = read_input(f, 4096, path)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16; save it as UTF-8 JSON Lines")
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:]
    while head.strip() == b"":
        more = read_input(f, 1 << 20, path)
        if not more:
            raise DataError(f"{path}: the file is empty")
        head = more
    shape = "array" if head.lstrip()[:1] == b"[" else "lines"
    return head, shape


def iter_json(path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """JSON Lines in byte chunks through the fast path, or one JSON array element by element."""
    limit = data.max_records
    read_size = min(CHUNK_BYTES, data.max_line_bytes)
    with open_input(path) as f:
        buf, shape = first_bytes(f, path)
        if shape == "array":
            yield from _iter_array(f, buf, path, data)
            return
        line_no, eof = 1, False
        while not eof:
            more = read_input(f, read_size, path)
            eof = not more
            buf += more
            if eof and buf and not buf.endswith(b"\n"):
                buf += b"\n"
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) > data.max_line_bytes:
                    buf = yield from _skip_long_line(f, buf, line_no, path, read_size)
                    line_no += 1
                continue
            first_end = buf.find(b"\n")
            if first_end > data.max_line_bytes:
                rej = Batch()
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


def _first_lines(block: bytes, n: int) -> bytes:
    pos = -1
    for _ in range(n):
        pos = block.find(b"\n", pos + 1)
    return block[: pos + 1]


def _skip_long_line(f, buf: bytes, line_no: int, path: Path, read_size: int):
    """Reject the over-long line starting `buf` and discard it without holding it; return what follows it (less than
    `read_size` bytes, so the caller still checks each line that follows against data.max_line_bytes)."""
    rej = Batch()
    rej.reject(line_no, None, "line_too_long", buf[: 4 * EXCERPT_CHARS])
    yield RAW_SCHEMA.empty_table(), pa.table(rej.rej, schema=REJECT_SCHEMA), line_no
    while True:
        chunk = read_input(f, read_size, path)
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
    element, eof, out = 0, False, Batch()
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
            more = read_input(f, CHUNK_BYTES, path)
            eof = not more
            text = text[pos:] + decode(more, eof)
            pos = 0
            continue
        element += 1
        check_record(obj, element, text[pos:end], data, out)
        pos = end
        if len(out.rec["line"]) + len(out.rej["line"]) >= 50_000:
            yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), element
            out = Batch()
        if limit is not None and element >= limit:
            break
    yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), element
