"""Ingest: every input shape, every reject reason, bounded lines, and user-fixable errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ABT_DATA
from desctune.config import DataConfig
from desctune.data import jsonlines
from desctune.data.ingest import ingest_file
from desctune.data.records import EXCERPT_CHARS, REASONS, content_uid
from desctune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"


def run(tmp_path: Path, payload: bytes, name: str = "in.jsonl", **data) -> tuple[dict, list[dict], list[dict]]:
    src = tmp_path / name
    src.write_bytes(payload)
    result = ingest_file(DataConfig(path=str(src), **data), tmp_path / "out")
    return result, pq.read_table(result["path"]).to_pylist(), pq.read_table(result["rejects_path"]).to_pylist()


def rec(uid: str, title: str = "A title", content: str = "Some content") -> bytes:
    return json.dumps({"uid": uid, "title": title, "content": content, "target_ind": [1, 2]}).encode()


def test_sample_is_read_whole(tmp_path):
    result = ingest_file(DataConfig(path=str(SAMPLE)), tmp_path)
    assert (result["lines_read"], result["records"], result["rejected"]) == (500, 500, 0)
    first = pq.read_table(result["path"]).slice(0, 1).to_pylist()[0]
    assert first == {"line": 1, "uid": "amztitles-trn-nonempty-0000", "title": "Girls Ballet Tutu Neon Pink",
                     "content": "High quality 3 layer ballet tutu. 12 inches in length"}


@pytest.mark.parametrize("shape", ["lf", "crlf", "bom", "gzip", "array", "array-pretty", "no-final-newline"])
def test_formats_give_the_same_records(tmp_path, shape):
    lines = [rec("a", content="caf\u00e9 &amp; more"), rec("b"), rec("c")]
    payload = b"\n".join(lines) + b"\n"
    name = "in.jsonl"
    if shape == "crlf":
        payload = payload.replace(b"\n", b"\r\n")
    elif shape == "bom":
        payload = b"\xef\xbb\xbf" + payload
    elif shape == "gzip":
        payload, name = gzip.compress(payload), "in.json.gz"
    elif shape == "array":
        payload = b"[" + b",".join(lines) + b"]"
        name = "in.json"
    elif shape == "array-pretty":
        payload = json.dumps([json.loads(x) for x in lines], indent=2).encode()
    elif shape == "no-final-newline":
        payload = payload.rstrip(b"\n")
    result, records, rejects = run(tmp_path, payload, name)
    assert [r["uid"] for r in records] == ["a", "b", "c"]
    assert records[0]["content"] == "caf\u00e9 &amp; more"
    assert [r["line"] for r in records] == [1, 2, 3]
    assert rejects == [] and result["lines_read"] == 3


def test_every_reject_reason_with_line_uid_and_excerpt(tmp_path):
    lines = [
        rec("ok1"),
        b'{"uid": "m1", "title": "broken"',
        b'{"uid": "u1", "title": "bad \xff byte", "content": "x"}',
        b"[1, 2, 3]",
        b'{"uid": "t0", "content": "no title"}',
        b'{"uid": "c0", "title": "no content", "content": null}',
        b'{"uid": "t1", "title": 42, "content": "numeric title"}',
        b'{"uid": "c1", "title": "list content", "content": ["a"]}',
        b'{"uid": {"x": 1}, "title": "t", "content": "c"}',
        rec("long", content="x" * 60),
        b"",
        rec("ok2"),
        b'{"title": "no uid", "content": "gets a line uid"}',
        b'{"uid": 7, "title": "numeric uid", "content": "kept"}',
    ]
    result, records, rejects = run(tmp_path, b"\n".join(lines) + b"\n", max_field_chars=50)
    assert [r["uid"] for r in records] == ["ok1", "ok2", content_uid("no uid", "gets a line uid"), "7"]
    got = [(r["line"], r["uid"], r["reason"]) for r in rejects]
    assert got == [
        (2, None, "malformed_json"),
        (3, None, "invalid_utf8"),
        (4, None, "not_object"),
        (5, "t0", "missing_title"),
        (6, "c0", "missing_content"),
        (7, "t1", "title_not_string"),
        (8, "c1", "content_not_string"),
        (9, None, "bad_uid"),
        (10, "long", "field_too_long"),
    ]
    assert set(got_reason for *_, got_reason in got) == set(REASONS) - {"line_too_long", "malformed_csv"}
    assert rejects[0]["excerpt"] == '{"uid": "m1", "title": "broken"'
    assert "\ufffd" in rejects[1]["excerpt"]
    assert result["lines_read"] == 14 and result["records"] + result["rejected"] == 13  # one blank line


def test_fast_path_rejects_keep_line_numbers_in_big_chunks(tmp_path, monkeypatch):
    """Null fields found by the vectorised path carry the same line numbers as the exact path would give."""
    monkeypatch.setattr(jsonlines, "SMALL_BLOCK_LINES", 4)
    lines = [rec(f"u{i}") for i in range(300)]
    lines[150] = b'{"uid": "n150", "title": null, "content": "c"}'
    lines[200] = b'{"uid": "bad", "title": "t", "content": "c"'
    result, records, rejects = run(tmp_path, b"\n".join(lines) + b"\n")
    assert [(r["line"], r["reason"]) for r in rejects] == [(151, "missing_title"), (201, "malformed_json")]
    assert len(records) == 298 and records[-1]["line"] == 300


def test_over_long_line_is_rejected_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonlines, "CHUNK_BYTES", 4096)
    huge = b'{"uid": "huge", "title": "t", "content": "' + b"y" * 200_000 + b'"}'
    payload = b"\n".join([rec("a"), huge, rec("b")]) + b"\n"
    result, records, rejects = run(tmp_path, payload, max_line_bytes=8192)
    assert [r["uid"] for r in records] == ["a", "b"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "line_too_long")]
    assert len(rejects[0]["excerpt"]) <= EXCERPT_CHARS


def _mixed_lines(n: int = 400) -> list[bytes]:
    """Records with every kind of line the reader meets, and lines around the chunk size of the tests below."""
    lines = [rec(f"u{i}", content=f"content {i} " + "z" * (i % 97)) for i in range(n)]
    lines[3] = b'{"uid": "m1", "title": "broken"'
    lines[40] = b'{"uid": "u1", "title": "bad \xff byte", "content": "x"}'
    lines[41] = b""
    lines[90] = b'{"uid": "n90", "title": null, "content": "c"}'
    lines[120] = rec("wide", content="w" * 3000)  # longer than the 1 KiB chunk, within max_line_bytes
    lines[350] = rec("huge", content="h" * 10_000)  # over max_line_bytes: rejected, the lines after it read
    lines[200] = b"   "
    lines[300] = b"[1, 2]"
    return lines


@pytest.mark.parametrize("shape", ["lf", "crlf-bom", "no-final-newline", "huge-last", "huge-first"])
def test_reading_in_small_chunks_writes_what_one_chunk_does(tmp_path, monkeypatch, shape):
    """A file read in 1 KiB chunks, lines straddling them: the same records and rejects, row for row, as read in one
    chunk, whatever the line ends, BOM, final newline or over-long first and last lines."""
    lines = _mixed_lines()
    if shape == "huge-last":
        lines[-1] = rec("huge-last", content="h" * 10_000)
    if shape == "huge-first":
        lines[0] = rec("huge-first", content="h" * 10_000)
    payload = b"\n".join(lines) + b"\n"
    if shape == "crlf-bom":
        payload = b"\xef\xbb\xbf" + payload.replace(b"\n", b"\r\n")
    elif shape in ("no-final-newline", "huge-last"):
        payload = payload.rstrip(b"\n")
    src = tmp_path / "in.jsonl"
    src.write_bytes(payload)
    data = DataConfig(path=str(src), max_line_bytes=8192)
    whole = ingest_file(data, tmp_path / "whole")
    monkeypatch.setattr(jsonlines, "CHUNK_BYTES", 1024)
    reads = []
    read_input = jsonlines.read_input
    monkeypatch.setattr(jsonlines, "read_input", lambda *a: reads.append(a[1]) or read_input(*a))
    small = ingest_file(data, tmp_path / "small")
    keys = ("lines_read", "records", "by_reason")
    assert {k: small[k] for k in keys} == {k: whole[k] for k in keys}
    for key in ("path", "rejects_path"):  # the same rows; the files' row groups follow the chunks
        assert pq.read_table(small[key]).combine_chunks().equals(pq.read_table(whole[key]).combine_chunks())
    assert whole["by_reason"]["line_too_long"] >= 1 and whole["lines_read"] == len(lines)
    assert len(reads) > 20  # lines did straddle chunks


def test_max_records_stops_early(tmp_path):
    payload = b"\n".join(rec(f"u{i}") for i in range(100)) + b"\n"
    result, records, _ = run(tmp_path, payload, max_records=10)
    assert result["lines_read"] == 10 and len(records) == 10


def test_configurable_field_names_on_real_other_shop_data(tmp_path):
    rows = [json.loads(x) for x in ABT_DATA.read_text(encoding="utf-8").splitlines()]
    renamed = "\n".join(json.dumps({"id": r["uid"], "name": r["title"], "description": r["content"]}) for r in rows)
    result, records, rejects = run(tmp_path, renamed.encode(), uid_field="id", title_field="name",
                                   content_field="description")
    assert result["records"] == len(rows) == 1081 and not rejects
    assert records[0]["uid"] == rows[0]["uid"] and records[0]["content"] == rows[0]["content"]
    with pytest.raises(DataError, match="title_field"):
        run(tmp_path, renamed.encode())


@pytest.mark.parametrize(
    "payload, name, message",
    [
        (b"", "in.jsonl", "empty"),
        (b"\n \n", "in.jsonl", "empty"),
        (b"uid,title,content\n1,a,b\n", "in.jsonl", "not JSON Lines"),
        (b"\x89PNG\xff\n\xfe\xfa\x00\n", "in.jsonl", "not decodable"),
        ("{}".encode("utf-16"), "in.jsonl", "UTF-16"),
        (gzip.compress(b"\n".join(rec(f"u{i}") for i in range(2000)))[:-200], "in.jsonl.gz", "truncated gzip"),
        (b'[{"uid": "a", "title": "t", "content": "c"}, {"uid": ', "in.json", "malformed or truncated"),
    ],
)
def test_unusable_input_is_one_line_error(tmp_path, payload, name, message):
    with pytest.raises(DataError, match=message) as err:
        run(tmp_path, payload, name)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "raw.parquet").exists()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ingest_file(DataConfig(path=str(tmp_path / "nope.jsonl")), tmp_path / "out")
