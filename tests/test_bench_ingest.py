"""The data-stage benchmark runs end to end on a small synthetic file and reports every timing it promises."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_data_stage_benchmark_reports_each_way_of_running(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--records", "3000", "--skip-pandas", "--skip-duckdb"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    assert {"desctune_seconds", "prepare_seconds", "prefect_prepare_seconds", "peak_rss_mb"} <= set(fields)
    assert all(float(fields[k]) > 0 for k in ("desctune_seconds", "prepare_seconds", "prefect_prepare_seconds"))
    assert "3000 lines" in proc.stdout
