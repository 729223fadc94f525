"""The record rules every reader applies: the raw and rejects schemas, the reject reasons, and the checks that turn
one decoded value into a record or a reject with its reason."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from desctune.config import DataConfig

RAW_SCHEMA = pa.schema([("line", pa.int64()), ("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
REJECT_SCHEMA = pa.schema(
    [("line", pa.int64()), ("uid", pa.string()), ("reason", pa.string()), ("excerpt", pa.string())]
)
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


def content_uid(title: str, content: str) -> str:
    """The uid of a record that has none: a hash of its title and content, so it does not depend on where the record
    sits in the file (a `line-N` uid moved when records were inserted, and with it the record's split)."""
    digest = hashlib.blake2b(title.encode("utf-8", "surrogatepass"), digest_size=10)
    digest.update(b"\x00")
    digest.update(content.encode("utf-8", "surrogatepass"))
    return "h-" + digest.hexdigest()


def excerpt(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text[:EXCERPT_CHARS]


class Batch:
    """Columns of records and rejects gathered from one chunk, in line order."""

    def __init__(self) -> None:
        self.rec: dict[str, list] = {"line": [], "uid": [], "title": [], "content": []}
        self.rej: dict[str, list] = {"line": [], "uid": [], "reason": [], "excerpt": []}

    def reject(self, line: int, uid: str | None, reason: str, raw: bytes | str) -> None:
        for k, v in zip(self.rej, (line, uid, reason, excerpt(raw))):
            self.rej[k].append(v)

    def record(self, line: int, uid: str, title: str, content: str) -> None:
        for k, v in zip(self.rec, (line, uid, title, content)):
            self.rec[k].append(v)


def check_record(obj, lineno: int, raw: bytes | str, data: DataConfig, out: Batch) -> None:
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


def fill_uids(records: pa.Table) -> pa.Table:
    """Give the records without a uid their content-derived one (Python only for those rows)."""
    uid = records.column("uid").combine_chunks()
    if not uid.null_count:
        return records
    missing = pc.is_null(uid)
    rows = records.filter(missing)
    derived = [content_uid(t, c) for t, c in zip(rows.column("title").to_pylist(), rows.column("content").to_pylist())]
    uid = pc.replace_with_mask(uid, missing, pa.array(derived, pa.string()))
    return records.set_column(records.schema.get_field_index("uid"), "uid", uid)
