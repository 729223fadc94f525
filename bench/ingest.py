"""Data-stage benchmark: `desctune prepare` against DuckDB's floor and a pandas baseline on the same trn.json.

Each side runs in its own process so peak RSS is its own. desctune is timed three times: the whole `desctune prepare`
command (with no Prefect API configured, the stages in its own process), the same with --prefect (the prepare flow on
Prefect's temporary server, its start included), and the ingest + clean stages alone (the pure functions the tasks
run). Two baselines, in the same run:
- DuckDB (`pip install -e .[bench]`): `read_json` of the three fields as VARCHAR, the length filters and DISTINCT, on
  2 threads, written to Parquet. It decodes no entity, strips no tag, repairs no mojibake and gives no reason for a
  reject, so it is a floor, not a peer: the target is `desctune prepare` within 4.5x of it.
- pandas, what notebooks do: `pd.read_json(lines=True)`, `html.unescape` per row, the same filters and duplicate rule.
Ends with one key=value line, the ratio (pandas' time over desctune's stage time) first, then
`duckdb_ratio` (desctune prepare's time over DuckDB's), `stages_duckdb_ratio` and `prefect_duckdb_ratio`.

    python -m bench.ingest [--records N] [--data trn.json] [--skip-pandas] [--skip-duckdb] [--skip-prefect]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = """
import json, resource, sys, time
from pathlib import Path
from desctune.config import DataConfig
from desctune.data.ingest import ingest_file
from desctune.data.clean import clean_file
data, out = DataConfig(path=sys.argv[1]), Path(sys.argv[2])
t = time.perf_counter()
raw = ingest_file(data, out / "ingest")
t_ingest = time.perf_counter() - t
cleaned = clean_file(raw, data, out / "clean")
print(json.dumps({"seconds": time.perf_counter() - t, "ingest_s": t_ingest, "kept": cleaned["kept"],
                  "lines": raw["lines_read"], "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BASELINE = """
import html, json, resource, sys, time
import pandas as pd
t = time.perf_counter()
df = pd.read_json(sys.argv[1], lines=True, dtype=False)
lines = len(df)
df = df.dropna(subset=["title", "content"])
for col in ("title", "content"):
    df[col] = df[col].astype(str).apply(html.unescape).str.split().str.join(" ")
df = df[(df["title"].str.len() >= 10) & (df["content"].str.len() >= 100)]
df = df.drop_duplicates("uid").drop_duplicates(["title", "content"])
df[["uid", "title", "content"]].to_parquet(sys.argv[2] + "/baseline.parquet")
print(json.dumps({"seconds": time.perf_counter() - t, "kept": len(df), "lines": lines,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# A command's own peak RSS (its process tree's largest), whatever ran in this benchmark before it.
PEAK = """
import json, resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

DUCKDB = """
import json, resource, sys, time
import duckdb
t = time.perf_counter()
con = duckdb.connect()
con.execute("SET threads = 2")
cols = "{'uid': 'VARCHAR', 'title': 'VARCHAR', 'content': 'VARCHAR'}"
src = sys.argv[1].replace("'", "''")
query = (f"SELECT DISTINCT uid, title, content FROM read_json('{src}', format='newline_delimited', columns={cols}) "
         "WHERE length(title) >= 10 AND length(content) >= 100")
con.execute(f"COPY ({query}) TO '{sys.argv[2]}/duckdb.parquet' (FORMAT parquet)")
kept = con.execute(f"SELECT count(*) FROM '{sys.argv[2]}/duckdb.parquet'").fetchone()[0]
print(json.dumps({"seconds": time.perf_counter() - t, "kept": kept,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code_or_cmd: list[str], env: dict) -> tuple[dict | None, float, str]:
    # The files the step before wrote go to the disk now, not while this step runs on the clock: each step writes
    # hundreds of megabytes, and their writeback fell on the next step's time.
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run(code_or_cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return (json.loads(last) if last.startswith("{") else None), wall, proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2_248_619, help="synthetic trn.json size (ignored with --data)")
    p.add_argument("--data", type=Path, help="an existing trn.json to use instead of a synthetic one")
    p.add_argument("--skip-pandas", "--skip-baseline", action="store_true", help="no pandas baseline (15 GB RSS)")
    p.add_argument("--skip-duckdb", action="store_true", help="no DuckDB floor")
    p.add_argument("--skip-prefect", action="store_true", help="no run of `desctune prepare --prefect`")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="desctune-bench-") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "trn.json"
            subprocess.run([sys.executable, "-m", "bench.make_trn", "--records", str(args.records), "--out", str(data)],
                           check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        size_mb = data.stat().st_size / 1e6
        load = os.getloadavg()[0]
        duck = None
        if not args.skip_duckdb:  # right before desctune, so both meet the same load and a warm page cache
            duck, _, _ = _run([sys.executable, "-c", DUCKDB, str(data), str(tmp)], env)
        command = [sys.executable, "-c", PEAK, sys.executable, "-m", "app.cli", "prepare", "--data", str(data)]
        prepare, prepare_wall, _ = _run([*command, "--out", str(tmp / "prepare")], env)
        prepare_rss = prepare["rss_mb"]
        flow = None
        if not args.skip_prefect:
            flow, flow_wall, _ = _run([*command, "--out", str(tmp / "prepare-flow"), "--prefect"], env)
        stages, _, _ = _run([sys.executable, "-c", STAGES, str(data), str(tmp / "stages")], env)
        if duck:  # again after desctune: on a shared machine the load drifts, so the floor is the mean of both runs
            again, _, _ = _run([sys.executable, "-c", DUCKDB, str(data), str(tmp)], env)
            duck["runs"] = [duck["seconds"], again["seconds"]]
            duck["seconds"] = sum(duck["runs"]) / 2
            duck["rss_mb"] = max(duck["rss_mb"], again["rss_mb"])
        base = None
        if not args.skip_pandas:
            base, _, _ = _run([sys.executable, "-c", BASELINE, str(data), str(tmp)], env)
        lines = stages["lines"]
        ours = lines / stages["seconds"]
        print(f"input: {data} ({size_mb:.0f} MB, {lines} lines); cores: {os.cpu_count()}; "
              f"load average before: {load:.2f}")
        print(f"desctune stages: {stages['seconds']:.1f} s (ingest {stages['ingest_s']:.1f} s), "
              f"{ours:,.0f} records/s, kept {stages['kept']}, peak RSS {stages['rss_mb']:.0f} MB")
        print(f"desctune prepare (whole command; no Prefect API configured, so the stages run in its process): "
              f"{prepare_wall:.1f} s, peak RSS {prepare_rss:.0f} MB")
        if flow:
            print(f"desctune prepare --prefect (the prepare flow, Prefect's temporary server start included): "
                  f"{flow_wall:.1f} s, peak RSS {flow['rss_mb']:.0f} MB")
        fields = {}
        if duck:
            floor = duck["seconds"]
            runs = " and ".join(f"{x:.1f}" for x in duck["runs"])
            print(f"DuckDB floor (read_json + length filters + DISTINCT, 2 threads): {duck['seconds']:.1f} s "
                  f"(mean of {runs} s, before and after desctune), "
                  f"kept {duck['kept']}, peak RSS {duck['rss_mb']:.0f} MB; desctune prepare is "
                  f"{prepare_wall / floor:.2f}x it, the stages alone {stages['seconds'] / floor:.2f}x"
                  + (f", with --prefect {flow_wall / floor:.2f}x" if flow else ""))
        if base:
            theirs = base["lines"] / base["seconds"]
            print(f"pandas baseline: {base['seconds']:.1f} s, {theirs:,.0f} records/s, kept {base['kept']}, "
                  f"peak RSS {base['rss_mb']:.0f} MB")
            fields["ratio"] = f"{ours / theirs:.2f}"
        if duck:
            fields |= {"duckdb_ratio": f"{prepare_wall / duck['seconds']:.2f}",
                       "stages_duckdb_ratio": f"{stages['seconds'] / duck['seconds']:.2f}",
                       **({"prefect_duckdb_ratio": f"{flow_wall / duck['seconds']:.2f}"} if flow else {}),
                       "duckdb_seconds": f"{duck['seconds']:.1f}", "duckdb_peak_rss_mb": f"{duck['rss_mb']:.0f}"}
        fields |= {
            "desctune_records_per_s": f"{ours:.0f}",
            "desctune_seconds": f"{stages['seconds']:.1f}",
            "prepare_seconds": f"{prepare_wall:.1f}",
            "peak_rss_mb": f"{stages['rss_mb']:.0f}",
            "prepare_peak_rss_mb": f"{prepare_rss:.0f}",
        }
        if flow:
            fields |= {"prefect_prepare_seconds": f"{flow_wall:.1f}", "prefect_peak_rss_mb": f"{flow['rss_mb']:.0f}"}
        if base:
            fields |= {"baseline_records_per_s": f"{base['lines'] / base['seconds']:.0f}",
                       "baseline_seconds": f"{base['seconds']:.1f}", "baseline_peak_rss_mb": f"{base['rss_mb']:.0f}"}
        print(" ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
