"""The input formats ingest reads, each into the same (records, rejects, lines read) chunks: JSON Lines or one JSON
array (`desctune.data.jsonlines`), CSV/TSV with a header row (optionally gzipped), Parquet, and a Hugging Face dataset
(a `save_to_disk` folder, or `hf://owner/name[:split]` where the network allows), all with the same field mapping
(data.uid_field, data.title_field, data.content_field) and the same rejects-with-reasons."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from desctune.config import DataConfig
from desctune.data.jsonlines import iter_json, open_input
from desctune.data.records import RAW_SCHEMA, REJECT_SCHEMA, Batch, check_record, excerpt, fill_uids
from desctune.errors import DataError

HF_PREFIX = "hf://"
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_BATCH_ROWS = 65_536


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
    yield from iter_json(Path(path), data)


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
    """The rules of `check_record` for a whole Arrow table (Parquet, Hugging Face): columns, not rows, in Python."""
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
    records = fill_uids(pa.table({"line": lines, "uid": uid, "title": title, "content": content}).filter(ok))
    if pc.all(ok).as_py():
        return records, REJECT_SCHEMA.empty_table()
    idx = pc.indices_nonzero(pc.invert(ok))
    bad_rows = table.take(idx).to_pylist()
    excerpts = [excerpt(orjson.dumps(row, default=str)) for row in bad_rows]
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


def load_hf(path: str):
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
    ds = load_hf(path)
    wanted = [f for f in (data.uid_field, data.title_field, data.content_field) if f in ds.column_names]
    ds = ds.select_columns(wanted).with_format("arrow")
    yield from _limited(ds.iter(batch_size=TABLE_BATCH_ROWS), data)


def _iter_csv(path: Path, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """CSV with a header row, rows checked like JSON objects; `line` is the row's first physical line (header = 1)."""
    delimiter = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
    csv.field_size_limit(max(data.max_line_bytes, 1 << 20))
    out, limit, rows = Batch(), data.max_records, 0
    with open_input(path) as raw:
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
                    check_record({k: v or None for k, v in zip(header, row)}, lineno, raw_text, data, out)
                if len(out.rec["line"]) + len(out.rej["line"]) >= TABLE_BATCH_ROWS:
                    yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), prev
                    out = Batch()
                if limit is not None and rows >= limit:
                    break
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc.reason} after line {prev})") from None
        except csv.Error as exc:
            raise DataError(f"{path}: malformed CSV after line {prev} ({exc})") from None
    yield pa.table(out.rec, schema=RAW_SCHEMA), pa.table(out.rej, schema=REJECT_SCHEMA), prev
