"""Clean: normalise titles and contents, drop unusable and duplicate records, quarantine every dropped one.

`clean_text` is the reference cleaner for one string: HTML entities (named, numeric, hex, double-escaped), tags and
<br>, mojibake (ftfy), NFC, control and zero-width characters, boilerplate stubs, whitespace runs. `clean_column`
gives the same result for a whole Arrow column: rows that are plain ASCII with no '&', '<' or control character
(most of trn.json) are cleaned with vectorised RE2 regexes, and only the rest go through `clean_text` in Python.
`clean_file` streams raw.parquet in batches, so memory stays bounded by a batch plus the sets used to find duplicates.
"""

from __future__ import annotations

import html
import json
import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

import ftfy
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from desctune.cache import STAGE_CACHE, code_version
from desctune.config import DataConfig
from desctune.files import atomic_path, file_sha256, stage_dir
from tasks.ingest import EXCERPT_CHARS, REJECT_SCHEMA, _report

log = logging.getLogger(__name__)

CLEAN_SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
BATCH_ROWS = 131_072
PARQUET = {"compression": "zstd"}

ENTITY = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
TAG = r"</?[A-Za-z][^<>]{0,1000}>"
# Python's str.split() whitespace, spelled out so Python's re and pyarrow's RE2 agree on it.
_WS_CODES = [(0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
             (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
_WS_RE2 = "[" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in _WS_CODES) + "]"
_WS_NOT_SPACE_RE2 = _WS_RE2.replace("\\x{1c}-\\x{20}", "\\x{1c}-\\x{1f}")
_WS_PY = "[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _WS_CODES) + "]"
STUB = r"-*{ws}*This text refers to (?:an?|the)[^.]{{0,80}}?edition(?: of this title)?\."
STUB_MARK = "This text refers"
_STUB_RE = re.compile(STUB.format(ws=_WS_PY))
_STUB_RE2 = STUB.format(ws=_WS_RE2)
_WS_RUN_RE2 = f"{_WS_RE2}{{2,}}|{_WS_NOT_SPACE_RE2}"
_ENTITY_RE, _TAG_RE = re.compile(ENTITY), re.compile(TAG)
# Control and invisible format characters, deleted (tab, newline and the like are whitespace, handled later).
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u200b-\u200d\u2060\u206a-\u206f\ufeff\ufff9-\ufffc]")
_CP1252_HIGH = bytes(range(0x80, 0xA0)).decode("cp1252", "ignore")
# UTF-8 read as Latin-1/cp1252: a lead byte followed by a continuation byte, plus stray C1 controls.
_MOJIBAKE_RE = re.compile(f"[\xc2-\xf4][\x80-\xbf{_CP1252_HIGH}]|[\x80-\x9f]")
# Rows the vectorised path must hand to Python first: entities, tags, non-ASCII, control characters.
_SLOW_RE2 = r"[&<\x00-\x08\x0e-\x1b\x7f]"
_FTFY = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, explain=False)

REASONS = {
    "empty_title": "the title is empty after cleaning",
    "empty_content": "the content is empty after cleaning (for example only a boilerplate stub)",
    "title_too_short": "the title is shorter than data.min_title_chars (length filter)",
    "content_too_short": "the content is shorter than data.min_content_chars (length filter)",
    "duplicate_uid": "an earlier record has the same uid",
    "duplicate_record": "an earlier record has the same title and content",
}


def _unescape(s: str) -> str:
    """Decode entities, repeatedly for double-escaped text ('&amp;#8217;' -> '&#8217;' -> '’')."""
    for _ in range(3):
        if "&" not in s or not _ENTITY_RE.search(s):
            break
        s = html.unescape(s)
    return s


def _decode(s: str) -> str:
    """First half of cleaning, only needed for strings with '&', '<', non-ASCII or control characters."""
    s = _unescape(s)
    if "<" in s:
        s = _TAG_RE.sub(" ", s)
    if not s.isascii():
        if _MOJIBAKE_RE.search(s):
            s = ftfy.fix_text(s, _FTFY)
        s = unicodedata.normalize("NFC", s)
    return _CONTROL_RE.sub("", s)


def _finish(s: str, strip_stubs: bool) -> str:
    """Second half: boilerplate stubs and whitespace runs (clean_column does this half with RE2)."""
    if strip_stubs and STUB_MARK in s:
        s = _STUB_RE.sub(" ", s)
    return " ".join(s.split())


def clean_text(s: str, strip_stubs: bool = True) -> str:
    """The cleaned form of one title or content string."""
    return _finish(_decode(s), strip_stubs)


def clean_column(arr: pa.Array, strip_stubs: bool = True) -> pa.Array:
    """`clean_text` applied to every string of an Arrow string array; only the decode half runs per row in Python."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if len(arr) == 0:
        return arr
    slow = pc.or_(pc.invert(pc.string_is_ascii(arr)), pc.match_substring_regex(arr, _SLOW_RE2))
    if pc.any(slow).as_py():
        decoded = [_decode(s) for s in pc.filter(arr, slow).to_pylist()]
        arr = pc.replace_with_mask(arr, slow, pa.array(decoded, pa.string()))
    if strip_stubs:
        has = pc.match_substring(arr, STUB_MARK)
        if pc.any(has).as_py():
            arr = pc.replace_with_mask(arr, has, pc.replace_substring_regex(pc.filter(arr, has), _STUB_RE2, " "))
    arr = pc.replace_substring_regex(arr, _WS_RUN_RE2, " ")
    return pc.ascii_trim(arr, " ")


def _excerpt(title: pa.Array, content: pa.Array) -> pa.Array:
    joined = pc.binary_join_element_wise(title, content, " | ")
    return pc.utf8_slice_codeunits(joined, 0, EXCERPT_CHARS)


class _Dedup:
    """First occurrence wins; later ones are duplicates by uid, else by (title, content)."""

    def __init__(self) -> None:
        self.uids: set[str] = set()
        self.pairs: set[int] = set()

    def reasons(self, uid: pa.Array, title: pa.Array, content: pa.Array) -> list[str | None]:
        out: list[str | None] = []
        for u, t, c in zip(uid.to_pylist(), title.to_pylist(), content.to_pylist()):
            key = (hash(t) & 0xFFFFFFFFFFFFFFFF) << 64 | (hash(c) & 0xFFFFFFFFFFFFFFFF)
            if u in self.uids:
                out.append("duplicate_uid")
            elif key in self.pairs:
                out.append("duplicate_record")
            else:
                out.append(None)
                self.uids.add(u)
                self.pairs.add(key)
        return out


def _clean_batch(batch: pa.RecordBatch, data: DataConfig, dedup: _Dedup) -> tuple[pa.Table, pa.Table]:
    """Cleaned records and rejects of one raw batch."""
    raw_title, raw_content = batch.column("title"), batch.column("content")
    title = clean_column(raw_title, data.strip_stubs)
    content = clean_column(raw_content, data.strip_stubs)
    tlen, clen = pc.utf8_length(title), pc.utf8_length(content)
    reason = pa.nulls(len(batch), pa.string())
    checks = [(pc.equal(tlen, 0), "empty_title"), (pc.equal(clen, 0), "empty_content")]
    if data.filters:
        checks += [
            (pc.less(tlen, data.min_title_chars), "title_too_short"),
            (pc.less(clen, data.min_content_chars), "content_too_short"),
        ]
    for mask, name in checks:
        reason = pc.if_else(pc.and_(pc.is_null(reason), mask), name, reason)
    ok = pc.is_null(reason)
    ok_idx = pc.indices_nonzero(ok)
    uid = batch.column("uid")
    dup = dedup.reasons(uid.take(ok_idx), title.take(ok_idx), content.take(ok_idx))
    if any(dup):
        reason = pc.replace_with_mask(reason, ok, pa.array(dup, pa.string()))
        ok = pc.is_null(reason)
    kept = pa.table({"uid": uid, "title": title, "content": content}).filter(ok)
    bad = pc.invert(ok)
    rejects = pa.table(
        {
            "line": batch.column("line").filter(bad),
            "uid": uid.filter(bad),
            "reason": reason.filter(bad),
            "excerpt": _excerpt(raw_title.filter(bad), raw_content.filter(bad)),
        },
        schema=REJECT_SCHEMA,
    )
    return kept, rejects


def clean_file(raw: dict, data: DataConfig, out_dir: Path) -> dict:
    """Stream raw.parquet into out_dir/clean.parquet and out_dir/rejects.parquet (ingest's rejects merged in)."""
    out_dir = Path(out_dir)
    clean_path, rej_path = out_dir / "clean.parquet", out_dir / "rejects.parquet"
    reasons: Counter[str] = Counter()
    kept = 0
    dedup = _Dedup()
    with atomic_path(clean_path) as clean_tmp, atomic_path(rej_path) as rej_tmp:
        with pq.ParquetWriter(clean_tmp, CLEAN_SCHEMA, **PARQUET) as cw, pq.ParquetWriter(
            rej_tmp, REJECT_SCHEMA, **PARQUET
        ) as rw:
            ingest_rejects = pq.read_table(raw["rejects_path"], schema=REJECT_SCHEMA)
            if ingest_rejects.num_rows:
                rw.write_table(ingest_rejects)
                reasons.update(ingest_rejects.column("reason").to_pylist())
            for batch in pq.ParquetFile(raw["path"]).iter_batches(batch_size=BATCH_ROWS):
                good, bad = _clean_batch(batch, data, dedup)
                if good.num_rows:
                    cw.write_table(good)
                    kept += good.num_rows
                if bad.num_rows:
                    rw.write_table(bad)
                    for d in pc.value_counts(bad.column("reason")).to_pylist():
                        reasons[d["values"]] += d["counts"]
    duplicates = reasons["duplicate_uid"] + reasons["duplicate_record"]
    rejected = sum(reasons.values())
    log.info("clean: %d kept, %d rejected %s", kept, rejected, dict(reasons))
    return {
        "path": str(clean_path),
        "sha256": file_sha256(clean_path),
        "rejects_path": str(rej_path),
        "rejects_sha256": file_sha256(rej_path),
        "input_sha256": raw["sha256"],
        "lines_read": raw.get("lines_read"),
        "kept": kept,
        "rejected": rejected,
        "by_reason": dict(sorted(reasons.items())),
        "duplicates": duplicates,
    }


CODE = code_version(__name__, "tasks.ingest")


def clean_key(data: DataConfig) -> str:
    """The part of the data config that changes clean's output."""
    fields = ("filters", "min_title_chars", "min_content_chars", "strip_stubs")
    return json.dumps({k: getattr(data, k) for k in fields}, sort_keys=True)


@task(name="clean", cache_policy=STAGE_CACHE, persist_result=True)
def clean(raw: dict, data: DataConfig, artifacts_dir: str, code: str = CODE) -> dict:
    from prefect import get_run_logger

    out_dir = stage_dir(artifacts_dir, "clean", raw["sha256"], raw["rejects_sha256"], clean_key(data), code)
    result = clean_file(raw, data, out_dir)
    get_run_logger().info(
        "cleaned: %d kept, %d rejected (%d duplicates)", result["kept"], result["rejected"], result["duplicates"]
    )
    rows = [{"count": k, "value": result[k]} for k in ("lines_read", "kept", "rejected", "duplicates")]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in result["by_reason"].items()]
    _report("clean counts", rows, "clean-counts")
    return result
