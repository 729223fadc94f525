"""`desctune prepare`: in this process without a Prefect API, real Prefect runs of the flow's tasks with one or with
--prefect; exit codes and messages; cache keyed on file content."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from app.cli import main
from conftest import ABT_DATA

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"


def test_prepare_sample(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(SAMPLE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    kept = pq.read_table(out / "clean.parquet")
    rejects = pq.read_table(out / "rejects.parquet")
    assert kept.column_names == ["uid", "title", "content"]
    assert rejects.column_names == ["line", "uid", "reason", "excerpt"]
    assert kept.num_rows + rejects.num_rows == 500
    assert f"lines read 500, kept {kept.num_rows}, rejected {rejects.num_rows}" in printed
    assert "content_too_short" in printed


def test_no_filters_only_turns_off_length_filters(tmp_path, capsys):
    out = tmp_path / "loose"
    assert main(["prepare", "--data", str(SAMPLE), "--out", str(out), "--no-filters"]) == 0
    reasons = set(pq.read_table(out / "rejects.parquet").column("reason").to_pylist())
    assert reasons and not reasons & {"content_too_short", "title_too_short"}
    assert reasons <= {"empty_content", "empty_title", "duplicate_record", "duplicate_uid"}


def test_cache_follows_file_content_not_name(tmp_path, capsys):
    src, out = tmp_path / "data.jsonl", tmp_path / "prepared"
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    src.write_text("".join(lines[:200]), encoding="utf-8")
    assert main(["prepare", "--data", str(src), "--out", str(out)]) == 0
    first = pq.read_table(out / "clean.parquet").num_rows
    stamp = (out / "clean.parquet").stat().st_mtime_ns

    renamed = tmp_path / "renamed.jsonl"
    src.rename(renamed)
    assert main(["prepare", "--data", str(renamed), "--out", str(out)]) == 0
    assert len(list((out / "stages").glob("ingest-*"))) == 1, "same content under another name is not re-ingested"

    renamed.write_text("".join(lines[:300]), encoding="utf-8")
    assert main(["prepare", "--data", str(renamed), "--out", str(out)]) == 0
    assert pq.read_table(out / "clean.parquet").num_rows > first
    assert (out / "clean.parquet").stat().st_mtime_ns != stamp
    assert len(list((out / "stages").glob("ingest-*"))) == 2


@pytest.mark.parametrize(
    "payload, name, message",
    [
        (None, "missing.jsonl", "input file not found"),
        (b"", "empty.jsonl", "the file is empty"),
        (b"<html><body>not json</body></html>\n", "page.jsonl", "not JSON Lines"),
        (b"\x89PNG\xff\x00\n\xfe\xfa\n", "image.jsonl", "not decodable as UTF-8"),
        (gzip.compress(SAMPLE.read_bytes())[:-500], "trn.json.gz", "truncated gzip"),
    ],
)
def test_unusable_input_exits_2_with_one_line(tmp_path, capsys, payload, name, message):
    src = tmp_path / name
    if payload is not None:
        src.write_bytes(payload)
    assert main(["prepare", "--data", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("desctune: ") and message in err and "\n" not in err
    assert "Traceback" not in err


def test_cli_process_prints_no_traceback(tmp_path):
    """The installed entry point: a bad file gives exit 2 and exactly one stderr line, before Prefect starts."""
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "prepare", "--data", str(tmp_path / "nope.json"), "--out",
         str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"desctune: input file not found: {tmp_path / 'nope.json'}"]


def test_abt_data_with_renamed_fields_via_config(tmp_path, capsys):
    rows = [json.loads(x) for x in ABT_DATA.read_text(encoding="utf-8").splitlines()]
    src = tmp_path / "abt.jsonl"
    src.write_text("\n".join(json.dumps({"sku": r["uid"], "name": r["title"], "desc": r["content"]}) for r in rows))
    cfg = tmp_path / "abt.yaml"
    cfg.write_text("data:\n  uid_field: sku\n  title_field: name\n  content_field: desc\n  min_content_chars: 20\n")
    assert main(["prepare", "--data", str(src), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 0
    kept = pq.read_table(tmp_path / "o" / "clean.parquet")
    assert kept.num_rows > 900 and kept.column("uid")[0].as_py() == rows[0]["uid"]


EARLY_SERVER = """
import json
import sys
import urllib.request
from app.apiserver import EarlyServer
server = EarlyServer()
assert server.proc is not None and "prefect" not in sys.modules
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client

@flow
def hello() -> str:
    get_run_logger().info("a line for the server")
    return "hi"

try:
    with server.use():
        assert hello() == "hi"
        with get_client(sync_client=True) as client:
            assert client.api_url.host == "127.0.0.1" and str(client.api_url) == server.url + "/"
    assert "prefect.server.api.server" not in sys.modules, "Prefect started a server of its own"
    # The run's log lines reached the server before use() returned, while it still runs.
    request = urllib.request.Request(server.url + "/logs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert "a line for the server" in [log["message"] for log in json.load(response)]
finally:
    proc = server.proc
    server.stop()
assert proc.poll() is not None
print("ok")
"""


def test_early_server_is_the_one_prefect_uses_and_is_stopped(tmp_path):
    """A fresh process (as `desctune prepare` is): the server starts before Prefect is imported, a real flow runs
    against it, its log lines reach the server before it is stopped, this process never imports Prefect's server
    package, and the server process is gone at the end."""
    proc = subprocess.run([sys.executable, "-c", EARLY_SERVER], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
    assert "Error logging to API" not in proc.stderr, proc.stderr[-2000:]


def test_early_server_starts_nothing_where_prefect_is_loaded_or_an_api_is_set(monkeypatch):
    from app.apiserver import EarlyServer

    assert EarlyServer().proc is None  # this test process has imported Prefect already
    monkeypatch.delitem(sys.modules, "prefect")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert EarlyServer().proc is None


@pytest.mark.parametrize("flags", [[], ["--prefect"]])
def test_cli_process_prepares_a_file(tmp_path, flags):
    """The whole command in its own process, with no Prefect API configured: in this process by default; with
    --prefect, the early server and the flow, whose run is logged."""
    out = tmp_path / "o"
    command = [sys.executable, "-m", "app.cli", "prepare", "--data", str(SAMPLE), "--out", str(out), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lines read 500" in proc.stdout
    assert pq.read_table(out / "clean.parquet").num_rows + pq.read_table(out / "rejects.parquet").num_rows == 500
    assert ("Flow run" in proc.stderr and "Finished in state Completed" in proc.stderr) == bool(flags), proc.stderr


def test_a_temporary_server_that_does_not_come_up_is_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    command = [sys.executable, "-m", "app.cli", "prepare", "--data", str(SAMPLE), "--out", str(tmp_path / "o"),
               "--prefect"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "desctune: Prefect's temporary API server did not answer within 1 s; on a busy machine raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running server"]


def _fail(*args, **kwargs):
    raise AssertionError("not expected to run")


def test_without_a_prefect_api_stages_run_here_and_a_rerun_takes_their_kept_results(tmp_path, capsys, monkeypatch):
    import desctune.data.clean
    import desctune.data.ingest
    import flows.prepare

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(flows.prepare, "prepare", _fail)
        assert main(["prepare", "--data", str(SAMPLE), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    kept = pq.read_table(out / "clean.parquet")
    stage_dirs = sorted((out / "stages").iterdir())
    assert [d.name.split("-")[0] for d in stage_dirs] == ["clean", "ingest"]
    assert all((d / "result.json").is_file() for d in stage_dirs)

    with monkeypatch.context() as m:  # a rerun reads nothing: both stages' kept results answer
        m.setattr(desctune.data.ingest, "ingest_file", _fail)
        m.setattr(desctune.data.clean, "clean_file", _fail)
        assert main(["prepare", "--data", str(SAMPLE), "--out", str(out)]) == 0
    assert capsys.readouterr().out == first
    assert pq.read_table(out / "clean.parquet").equals(kept)

    raw = next((out / "stages").glob("ingest-*/raw.parquet"))
    raw.unlink()  # a kept result whose file is gone is not taken: the stage runs again
    assert main(["prepare", "--data", str(SAMPLE), "--out", str(out)]) == 0
    assert raw.is_file() and capsys.readouterr().out == first


def test_prefect_flag_or_a_configured_api_runs_the_flow(tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import app.prepare

    monkeypatch.setattr(app.prepare, "run_stages", _fail)
    assert main(["prepare", "--data", str(SAMPLE), "--out", str(tmp_path / "o"), "--prefect"]) == 0
    assert "lines read 500" in capsys.readouterr().out

    assert not app.prepare.prefect_api_configured()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # as a profile would set it
        assert app.prepare.prefect_api_configured()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert app.prepare.prefect_api_configured()


def test_a_cached_file_that_changed_since_it_was_written_is_recomputed(tmp_path, capsys, caplog):
    """A kept clean.parquet with one byte flipped is not handed out again: the rerun says which file changed in one
    line, cleans again and writes the file the first run wrote."""
    out = tmp_path / "o"
    assert main(["prepare", "--data", str(SAMPLE), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    kept = (out / "clean.parquet").read_bytes()
    cached = next((out / "stages").glob("clean-*/clean.parquet"))
    damaged = bytearray(cached.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (out / "clean.parquet").unlink()  # the published copy is a hard link to the cached file: flip only the cached one
    cached.write_bytes(bytes(damaged))

    with caplog.at_level("WARNING"):
        assert main(["prepare", "--data", str(SAMPLE), "--out", str(out)]) == 0
    assert capsys.readouterr().out == first
    [line] = [r.getMessage() for r in caplog.records if "changed since it was written" in r.getMessage()]
    assert line.startswith(f"{cached} changed since it was written (sha256 ") and line.endswith("recomputing clean")
    assert cached.read_bytes() == kept == (out / "clean.parquet").read_bytes()
