"""Ingest: stream an input into raw.parquet (line, uid, title, content) plus ingest_rejects.parquet.

The input's format decides the reader (`desctune.data.readers`: JSON Lines or a JSON array, CSV/TSV, Parquet, a
Hugging Face dataset); every reader applies the same field mapping and record rules (`desctune.data.records`). Without
a uid the record's uid is derived from its title and content (`content_uid`), so it never depends on the record's
position. Every line that is not a usable record becomes a reject row (line number, uid if known, reason, raw
excerpt): nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from desctune.config import DataConfig
from desctune.data.readers import check_source, iter_chunks, load_hf, source_kind
from desctune.data.records import RAW_SCHEMA, REJECT_SCHEMA
from desctune.errors import DataError
from desctune.files import HashingSink, atomic_path, dir_sha256, file_sha256, start_stage
from desctune.stages import stage_folder

log = logging.getLogger(__name__)

# The data settings that change what ingest writes (the file itself is keyed by its content hash).
INGEST_FIELDS = ("uid_field", "title_field", "content_field", "max_records", "max_field_chars", "max_line_bytes")


# raw.parquet is an intermediate that clean reads once, in order: uncompressed, without dictionaries (the texts are
# nearly all distinct) or statistics, so it is cheap to write and read; the outputs users keep (clean.parquet,
# rejects) are zstd.
RAW_PARQUET = {"compression": "none", "use_dictionary": False, "write_statistics": False}
# Rejects (here and in clean): zstd; a dictionary only for the reason, the one column whose values repeat;
# statistics on the short columns a reader may filter on.
REJECT_PARQUET = {"compression": "zstd", "use_dictionary": ["reason"], "write_statistics": ["line", "uid", "reason"]}


def source_fingerprint(path: str | Path) -> str:
    """A hash of the input's content: the file's sha256, a folder's files, or a hub dataset's own fingerprint."""
    check_source(path)
    kind = source_kind(path)
    if kind == "hf":
        ds = load_hf(str(path))
        return hashlib.sha256(f"{path}\x1f{ds._fingerprint}".encode()).hexdigest()
    if kind == "hf-folder":
        return dir_sha256(path)
    # 64 MiB a read: each read takes the GIL back, which beside a busy thread (Prefect's engine) waits up to a switch
    # interval.
    return file_sha256(path, chunk=64 << 20)


def ingest_folder(artifacts_dir: str | Path, data: DataConfig, input_sha256: str) -> Path:
    """The ingest stage's folder for this input and these settings (what the ingest task and `desctune prepare` use)."""
    return stage_folder(artifacts_dir, "ingest", input_sha256, data.subset(INGEST_FIELDS))


def ingest_file(data: DataConfig, out_dir: Path) -> dict:
    """Stream `data.path` into out_dir/raw.parquet and out_dir/ingest_rejects.parquet; return counts and hashes."""
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
