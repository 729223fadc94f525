"""Data-stage benchmark: `desctune prepare` against a straightforward pandas baseline on the same trn.json.

Each side runs in its own process so peak RSS is its own. desctune is timed twice: the whole `desctune prepare`
command (Prefect's temporary server start included) and its ingest + clean stages alone (the pure functions the
tasks run). The baseline is what notebooks do: `pd.read_json(lines=True)`, `html.unescape` per row, the same filters
and duplicate rule. Ends with one key=value line, the ratio (stage time vs baseline) first.

    python -m bench.ingest [--records N] [--data trn.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from desctune.ingest import ingest_file
from desctune.clean import clean_file
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


def _run(code_or_cmd: list[str], env: dict) -> tuple[dict | None, float, str]:
    t = time.perf_counter()
    proc = subprocess.run(code_or_cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return (json.loads(last) if last.startswith("{") else None), wall, proc.stdout


def _child_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2_248_619, help="synthetic trn.json size (ignored with --data)")
    p.add_argument("--data", type=Path, help="an existing trn.json to use instead of a synthetic one")
    p.add_argument("--skip-baseline", action="store_true")
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
        _, prepare_wall, _ = _run([sys.executable, "-m", "desctune.cli", "prepare", "--data", str(data), "--out",
                                   str(tmp / "prepare")], env)
        prepare_rss = _child_rss_mb()
        stages, _, _ = _run([sys.executable, "-c", STAGES, str(data), str(tmp / "stages")], env)
        base = None
        if not args.skip_baseline:
            base, _, _ = _run([sys.executable, "-c", BASELINE, str(data), str(tmp)], env)
        lines = stages["lines"]
        ours = lines / stages["seconds"]
        print(f"input: {data} ({size_mb:.0f} MB, {lines} lines); cores: {os.cpu_count()}; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        print(f"desctune stages: {stages['seconds']:.1f} s (ingest {stages['ingest_s']:.1f} s), "
              f"{ours:,.0f} records/s, kept {stages['kept']}, peak RSS {stages['rss_mb']:.0f} MB")
        print(f"desctune prepare (whole command, Prefect server start included): {prepare_wall:.1f} s, "
              f"peak RSS {prepare_rss:.0f} MB")
        fields = {}
        if base:
            theirs = base["lines"] / base["seconds"]
            print(f"pandas baseline: {base['seconds']:.1f} s, {theirs:,.0f} records/s, kept {base['kept']}, "
                  f"peak RSS {base['rss_mb']:.0f} MB")
            fields["ratio"] = f"{ours / theirs:.2f}"
        fields |= {
            "desctune_records_per_s": f"{ours:.0f}",
            "desctune_seconds": f"{stages['seconds']:.1f}",
            "prepare_seconds": f"{prepare_wall:.1f}",
            "peak_rss_mb": f"{stages['rss_mb']:.0f}",
            "prepare_peak_rss_mb": f"{prepare_rss:.0f}",
        }
        if base:
            fields |= {"baseline_records_per_s": f"{base['lines'] / base['seconds']:.0f}",
                       "baseline_seconds": f"{base['seconds']:.1f}", "baseline_peak_rss_mb": f"{base['rss_mb']:.0f}"}
        print(" ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
