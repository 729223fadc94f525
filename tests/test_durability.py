"""What survives a crash or a power loss: published files and folders are fsynced with the folder that holds them,
a stage sweeps the temporaries a killed writer left, and a cached stage whose folder was deleted runs again."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import SAMPLE, head_records, tiny_config
from desctune.config import DataConfig
from desctune.data.ingest import ingest_file
from desctune.files import atomic_dir, atomic_path, write_parquet
from desctune.models import provision
from desctune.training.loop import train_adapter
from test_train import records, token_files


@pytest.fixture
def fsynced(monkeypatch) -> list[tuple[str, bool]]:
    """Every os.fsync of this test, as (path, is a directory), in order; the real fsync still runs."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def spy(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, os.path.isdir(path)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def synced_before(calls: list[tuple[str, bool]], first, then) -> bool:
    """True when a call matching `first` comes before one matching `then`."""
    i = next((n for n, c in enumerate(calls) if first(c)), None)
    return i is not None and any(then(c) for c in calls[i + 1:])


def test_a_written_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, fsynced):
    out = tmp_path / "stage" / "new" / "table.parquet"
    write_parquet(pd.DataFrame({"a": [1, 2]}), out)
    assert out.is_file()
    assert synced_before(fsynced, lambda c: ".table.parquet.tmp-" in c[0] and not c[1],
                         lambda c: c == (str(out.parent), True))
    assert (str(tmp_path / "stage"), True) in fsynced  # the new folder's own entry, in its parent

    fsynced.clear()
    with atomic_path(tmp_path / "note.txt") as tmp:
        tmp.write_text("x")
    assert synced_before(fsynced, lambda c: ".note.txt.tmp-" in c[0], lambda c: c == (str(tmp_path), True))


def test_a_published_folder_has_every_file_and_folder_fsynced_then_its_parent(tmp_path, fsynced):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
        (tmp / "meta.json").write_text("{}")
    files = {Path(p).name for p, is_dir in fsynced if not is_dir}
    assert files == {"weights.bin", "meta.json"}
    assert synced_before(fsynced, lambda c: c[1] and ".adapter.tmp-" in c[0], lambda c: c == (str(tmp_path), True))


def test_training_checkpoints_are_fsynced_when_they_are_published(tmp_path, tiny_model_dir, tiny_tokenizer, fsynced):
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 3, "save_steps": 2, "batch_size": 4})
    df = records(16)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:12], df.iloc[12:])
    base = provision(str(tiny_model_dir), tmp_path)
    fsynced.clear()
    out = tmp_path / "train"
    train_adapter(tokens, base, cfg, out)
    checkpoints = out / "checkpoints"
    for name in ("training.pt", "state.json"):
        assert synced_before(fsynced, lambda c, n=name: c[0].endswith(f"/{n}") and ".checkpoint-2.tmp-" in c[0],
                             lambda c: c == (str(checkpoints), True)), name
    assert synced_before(fsynced, lambda c: c[0].endswith("adapter_model.safetensors"),
                         lambda c: c == (str(out), True))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_stage_sweeps_what_a_killed_writer_left_but_not_a_live_writers_file(tmp_path, caplog):
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 20)
    out = tmp_path / "stages" / "ingest-0123456789ab"
    (out / "nested").mkdir(parents=True)
    dead, alive = dead_pid(), os.getppid()
    left = [out / f".raw.parquet.tmp-{dead}-0badc0de", out / "nested" / f".x.tmp-{dead}-12345678",
            out.parent / f".{out.name}.tmp-{dead}-abcdef01"]
    for p in left:
        p.write_bytes(b"half written")
    (out / f".adapter.tmp-{dead}-feedbeef").mkdir()
    live = out / f".rejects.parquet.tmp-{alive}-87654321"
    live.write_bytes(b"being written")
    with caplog.at_level("WARNING"):
        ingest_file(DataConfig(path=str(records)), out)
    assert not [p for p in [*left, out / f".adapter.tmp-{dead}-feedbeef"] if p.exists()]
    assert live.read_bytes() == b"being written"
    assert (out / "raw.parquet").is_file()
    assert any("an interrupted write left in" in r.getMessage() for r in caplog.records)


async def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def test_a_cached_stage_whose_folder_was_deleted_runs_again(tmp_path):
    from flows.prepare import prepare

    records = head_records(SAMPLE, tmp_path / "records.jsonl", 30)
    data, artifacts = DataConfig(path=str(records)), str(tmp_path / "artifacts")
    first = prepare(data, artifacts, return_state=True)
    _, cleaned = first.result()
    shutil.rmtree(Path(cleaned.clean.path).parent)

    again = prepare(data, artifacts, return_state=True)
    states = asyncio.run(task_states(again.state_details.flow_run_id))
    assert states["ingest"] == "Cached" and states["clean"] == "Completed", states
    _, recleaned = again.result()
    assert Path(recleaned.clean.path).is_file() and recleaned.clean.sha256 == cleaned.clean.sha256

    third = prepare(data, artifacts, return_state=True)  # the recomputed result is the cached one from now on
    states = asyncio.run(task_states(third.state_details.flow_run_id))
    assert states["clean"] == "Cached" and Path(third.result()[1].clean.path).is_file()
