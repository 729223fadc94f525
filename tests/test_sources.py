"""A content-derived uid keeps every record's split when records are added."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from desctune.clean import clean_file
from desctune.config import DataConfig
from desctune.ingest import ingest_file
from desctune.sample import split_frame


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
