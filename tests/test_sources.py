"""Inputs beyond JSON: CSV, Parquet and Hugging Face datasets, with the same field mapping and rejects-with-reasons,
and a content-derived uid that keeps every record's split when records are added."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from desctune.config import DataConfig
from desctune.data.clean import clean_file
from desctune.data.ingest import ingest_file, source_fingerprint
from desctune.data.records import content_uid
from desctune.data.sample import split_frame
from desctune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
MAPPING = {"uid_field": "sku", "title_field": "name", "content_field": "desc"}
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def sample_rows(n: int = 40) -> list[dict]:
    rows = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines()[:n]]
    return [{"sku": r["uid"], "name": r["title"], "desc": r["content"], "extra": 1} for r in rows]


def ingest(tmp_path: Path, path: Path | str, **data) -> tuple[dict, list[dict], list[dict]]:
    result = ingest_file(DataConfig(path=str(path), **data), tmp_path / "out")
    return result, pq.read_table(result["path"]).to_pylist(), pq.read_table(result["rejects_path"]).to_pylist()


def json_reference(tmp_path: Path, rows: list[dict]) -> list[dict]:
    src = tmp_path / "ref.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, records, rejects = ingest(tmp_path / "ref", src, **MAPPING)
    assert not rejects
    return records


def triples(records: list[dict]) -> list[tuple]:
    return [(r["uid"], r["title"], r["content"]) for r in records]


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> None:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("name", ["in.csv", "in.tsv", "in.csv.gz"])
def test_csv_with_field_mapping_gives_the_json_records(tmp_path, name):
    rows = sample_rows()
    rows[3]["desc"] = 'A "quoted", multi-line\ndescription, with commas'
    src = tmp_path / name
    write_csv(tmp_path / "plain", rows, "\t" if name == "in.tsv" else ",")
    payload = (tmp_path / "plain").read_bytes()
    src.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
    result, records, rejects = ingest(tmp_path, src, **MAPPING)
    ref = json_reference(tmp_path, rows)
    assert triples(records) == triples(ref)
    assert not rejects and result["records"] == len(rows)
    # `line` is the physical line a row starts on (the header is line 1; row 4 spans two lines)
    assert [r["line"] for r in records[:6]] == [2, 3, 4, 5, 7, 8]


def test_csv_rejects_carry_line_and_reason(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(
        "sku,name,desc\n"
        "a1,A good title,Some content\n"
        "a2,,content but no title\n"
        "a3,title but no content\n"
        "a4,too,many,fields\n"
        "\n"
        ",No sku here,so the uid comes from the content\n"
        "a6,Fine again,More content\n",
        encoding="utf-8",
    )
    result, records, rejects = ingest(tmp_path, src, **MAPPING)
    assert [(r["line"], r["uid"]) for r in records] == [
        (2, "a1"), (7, content_uid("No sku here", "so the uid comes from the content")), (8, "a6")]
    assert [(r["line"], r["uid"], r["reason"]) for r in rejects] == [
        (3, "a2", "missing_title"), (4, "a3", "missing_content"), (5, None, "malformed_csv")]
    assert rejects[0]["excerpt"] == "a2,,content but no title"
    assert result["records"] + result["rejected"] == 6


def test_csv_in_wrong_encoding_is_one_line_error(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes("sku,name,desc\nb1,Caf\u00e9 au lait,latin-1 text\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        ingest(tmp_path, src, **MAPPING)
    assert "\n" not in str(err.value)


def test_parquet_with_field_mapping_and_rejects(tmp_path):
    rows = sample_rows()
    table = pa.Table.from_pylist(rows)
    bad = pa.table({
        "sku": ["p1", "p2", None, "p4"],
        "name": [None, "no content", "uid from content", "x" * 20_001],
        "desc": ["no title", None, "derived uid", "too long"],
        "extra": [1, 2, 3, 4],
    })
    src = tmp_path / "in.parquet"
    pq.write_table(pa.concat_tables([table, bad]), src, row_group_size=7)
    result, records, rejects = ingest(tmp_path, src, **MAPPING)
    ref = json_reference(tmp_path, rows)
    assert triples(records[:-1]) == triples(ref)
    assert records[-1]["uid"] == content_uid("uid from content", "derived uid") and records[-1]["line"] == 43
    n = len(rows)
    assert [(r["line"], r["uid"], r["reason"]) for r in rejects] == [
        (n + 1, "p1", "missing_title"), (n + 2, "p2", "missing_content"), (n + 4, "p4", "field_too_long")]
    assert json.loads(rejects[0]["excerpt"])["desc"] == "no title"


def test_parquet_non_string_title_column_is_rejected_with_its_reason(tmp_path):
    src = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"uid": [1, 2], "title": [10, 20], "content": ["c", "d"]}), src)
    with pytest.raises(DataError, match="title_not_string"):
        ingest(tmp_path, src)


@pytest.mark.skipif(not HAS_DATASETS, reason="the `datasets` library is not installed")
def test_hugging_face_save_to_disk_folder(tmp_path):
    import datasets

    rows = sample_rows()
    rows.append({"sku": "h1", "name": None, "desc": "no title", "extra": 0})
    folder = tmp_path / "hfds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    result, records, rejects = ingest(tmp_path, folder, **MAPPING)
    ref = json_reference(tmp_path, rows[:-1])
    assert triples(records) == triples(ref)
    assert [(r["line"], r["uid"], r["reason"]) for r in rejects] == [(len(rows), "h1", "missing_title")]
    assert len(source_fingerprint(folder)) == 64


def test_a_folder_that_is_not_a_dataset_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="not a Hugging Face dataset"):
        ingest(tmp_path, tmp_path)


def _splits(tmp_path: Path, rows: list[dict]) -> dict[tuple[str, str], str]:
    tmp_path.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = DataConfig(path=str(src), filters=False)
    cleaned = clean_file(ingest_file(data, tmp_path / "ingest"), data, tmp_path / "clean")
    parts = split_frame(pq.read_table(cleaned["path"]).to_pandas(), data)
    return {(r.title, r.content): name for name, df in parts.items() for r in df.itertuples()}


def test_adding_records_never_moves_an_existing_records_split(tmp_path):
    """Without a uid field the uid comes from the content, so inserting records anywhere moves no split (a
    `line-N` uid used to move every record after the insertion)."""
    rows = [{"title": f"Product number {i}", "content": f"Description of product {i}, long enough."}
            for i in range(400)]
    before = _splits(tmp_path / "a", rows)
    grown = [{"title": f"New product {i}", "content": f"A newly added description {i}."} for i in range(300)]
    mixed = grown[:100] + rows[:200] + grown[100:200] + rows[200:] + grown[200:]
    after = _splits(tmp_path / "b", mixed)
    assert len(before) == 400 and len(after) == 700
    assert all(after[key] == split for key, split in before.items())
    assert set(before.values()) == {"train", "val", "test"}


def test_without_the_datasets_library_the_error_names_the_fix(tmp_path, monkeypatch):
    folder = tmp_path / "hfds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        ingest(tmp_path, folder)


def test_prepare_reads_a_csv_through_the_flow(tmp_path, capsys):
    from app.cli import main

    src = tmp_path / "shop.csv"
    write_csv(src, sample_rows(60))
    cfg = tmp_path / "profile.yaml"
    cfg.write_text("data:\n  uid_field: sku\n  title_field: name\n  content_field: desc\n")
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(src), "--out", str(out), "--config", str(cfg)]) == 0
    kept = pq.read_table(out / "clean.parquet")
    rejects = pq.read_table(out / "rejects.parquet")
    assert kept.num_rows + rejects.num_rows == 60 and kept.num_rows > 20
    assert "lines read 61" in capsys.readouterr().out
