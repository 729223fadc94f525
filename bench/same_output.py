"""Check that a change to ingest or clean leaves their output as it was: run the stages on some inputs, keep the
outputs, and compare them row by row with outputs kept earlier (by another version of the code).

    python -m bench.same_output --out DIR FILE... [--against OLD_DIR]

For each FILE, DIR/<file name>/ gets raw.parquet, ingest_rejects.parquet, clean.parquet and rejects.parquet; with
--against, each table is compared with the one of the same name under OLD_DIR (cells, not bytes: the row-group
layout may change) and the first differing rows are printed. Exit 1 when any table differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

TABLES = ("ingest/raw.parquet", "ingest/ingest_rejects.parquet", "clean/clean.parquet", "clean/rejects.parquet")


def run_stages(src: Path, out: Path) -> None:
    from desctune.config import DataConfig
    from desctune.data.clean import clean_file
    from desctune.data.ingest import ingest_file

    shutil.rmtree(out, ignore_errors=True)
    data = DataConfig(path=str(src))
    raw = ingest_file(data, out / "ingest")
    clean_file(raw, data, out / "clean")


def differences(new: Path, old: Path, show: int = 3) -> list[str]:
    a, b = pq.read_table(new), pq.read_table(old)
    if a.schema != b.schema:
        return [f"schema {a.schema} != {b.schema}"]
    if a.num_rows != b.num_rows:
        out = [f"{a.num_rows} rows, were {b.num_rows}"]
    else:
        out = []
    if a.equals(b):
        return []
    rows_a, rows_b = a.to_pylist(), b.to_pylist()
    for i, (x, y) in enumerate(zip(rows_a, rows_b)):
        if x != y:
            out.append(f"row {i}: now {x!r:.300}\n        was {y!r:.300}")
            if len(out) >= show + 1:
                break
    return out or ["differ"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--against", type=Path)
    args = p.parse_args(argv)
    failed = False
    for src in args.files:
        out = args.out / src.name
        run_stages(src, out)
        if args.against is None:
            print(f"{src.name}: written to {out}")
            continue
        for table in TABLES:
            diff = differences(out / table, args.against / src.name / table)
            rows = pq.ParquetFile(out / table).metadata.num_rows
            print(f"{src.name} {table}: {'identical' if not diff else 'DIFFERENT'} ({rows} rows)")
            for line in diff:
                print("   ", line)
            failed |= bool(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
