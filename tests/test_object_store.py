"""Stages on a shared object store: a real S3-compatible server (moto's, on a loopback port) holds the artifacts,
Prefect's stage cache and MLflow's artifacts; two worker processes with their own working directory, local cache
and Prefect database run the real `desctune run` against it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from hashlib import sha256
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, SESSION_ENV, head_records
from desctune.results import Split, StageFile, StageFolder

BUCKET = "desctune-test"
STAGES = ("ingest", "clean", "sample", "tokenize", "train", "evaluate")


def start_s3():
    """moto's S3 server on a free loopback port, with one bucket: (server, the AWS variables that reach it)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "desctune-test", "AWS_SECRET_ACCESS_KEY": "desctune-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
    return server, env


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3 server (conftest.py's `s3_server`), named by the standard AWS variables in this module."""
    saved = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)
    forget_clients()
    yield s3_server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    forget_clients()


def forget_clients() -> None:
    """Drop the S3 clients made so far (fsspec keeps one per set of arguments), so the next one reads the environment."""
    from s3fs import S3FileSystem

    from desctune import store

    store.filesystem.cache_clear()
    S3FileSystem.clear_instance_cache()


def keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def stage_folder_with_files(root: Path) -> Path:
    folder = root / "stages" / "demo-0123456789ab"
    (folder / "adapter").mkdir(parents=True)
    (folder / "a.parquet").write_bytes(b"a" * 1000)
    (folder / "adapter" / "weights.bin").write_bytes(os.urandom(4096))
    return folder


def test_a_published_folder_is_fetched_whole_by_another_worker(s3, tmp_path, monkeypatch):
    from desctune import store

    url = f"s3://{BUCKET}/unit-publish"
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "worker-a"))
    folder = stage_folder_with_files(store.local_root(url))
    result = store.publish(url, folder, Split.written(folder / "a.parquet", rows=3))
    assert result == Split(path=f"{url}/stages/demo-0123456789ab/a.parquet", sha256=sha256(b"a" * 1000).hexdigest(),
                           size=1000, rows=3)
    assert f"unit-publish/stages/demo-0123456789ab/{store.MARKER}" in keys("unit-publish/")

    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "worker-b"))
    local = store.localize(url, result)
    assert local.path.startswith(str(tmp_path / "worker-b"))
    fetched = Path(local.path).parent
    assert (fetched / "adapter" / "weights.bin").read_bytes() == (folder / "adapter" / "weights.bin").read_bytes()
    assert store.portable(url, local) == result


def test_a_folder_without_its_marker_is_never_used(s3, tmp_path, monkeypatch):
    """An upload that stopped half-way leaves no marker: readers refuse the folder, the stage cache forgets a result
    naming it, and publishing again completes it."""
    from desctune import store
    from tasks.stage import output_problem

    url = f"s3://{BUCKET}/unit-interrupted"
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "writer"))
    folder = stage_folder_with_files(store.local_root(url))
    real_upload = store.upload

    def killed_after_one_file(fs, folder, key, files):
        first = next(iter(files))
        real_upload(fs, folder, key, {first: files[first]})
        raise ConnectionError("writer killed mid-upload")

    monkeypatch.setattr(store, "upload", killed_after_one_file)
    with pytest.raises(ConnectionError):
        store.publish(url, folder, {})
    uploaded = keys("unit-interrupted/")
    assert len(uploaded) == 1 and not any(k.endswith(store.MARKER) for k in uploaded)
    cached = StageFile(path=f"{url}/stages/demo-0123456789ab/a.parquet", sha256=sha256(b"a" * 1000).hexdigest(),
                       size=1000)
    assert output_problem(cached, url) == (f"{url}/stages/demo-0123456789ab", "missing")
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "reader"))
    with pytest.raises(store.StoreError, match="not published"):
        store.localize(url, cached)

    monkeypatch.setattr(store, "upload", real_upload)
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "writer"))
    store.publish(url, folder, {})
    assert output_problem(cached, url) is None
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "reader"))
    assert Path(store.localize(url, cached).path).read_bytes() == b"a" * 1000


def test_a_changed_file_is_fetched_again_from_the_store_or_its_stage_recomputed(s3, tmp_path, monkeypatch):
    """A cached result's files are checked as the worker would read them: a changed copy in the worker's mirror is
    fetched again from the store; a file changed in the store itself (its marker intact) makes the stage recompute."""
    import boto3

    from desctune import store
    from tasks.stage import output_problem

    url = f"s3://{BUCKET}/unit-verify"
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "writer"))
    folder = stage_folder_with_files(store.local_root(url))
    cached = store.publish(url, folder, StageFolder.written(folder / "adapter"))
    assert output_problem(cached, url) is None

    weights = folder / "adapter" / "weights.bin"
    written = weights.read_bytes()
    weights.write_bytes(os.urandom(len(written)))
    assert output_problem(cached, url) is None and weights.read_bytes() == written

    boto3.client("s3").put_object(Bucket=BUCKET, Key="unit-verify/stages/demo-0123456789ab/adapter/weights.bin",
                                  Body=os.urandom(len(written)))
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "reader"))
    assert output_problem(cached, url) == (f"{url}/stages/demo-0123456789ab",
                                           "its files in the store do not match the folder's publication marker")


def test_a_bad_store_is_one_line(s3, monkeypatch):
    from desctune import store
    from desctune.errors import StoreError

    with pytest.raises(StoreError, match="bucket no-such-bucket does not exist"):
        store.check("s3://no-such-bucket/run")
    with pytest.raises(StoreError, match="no file system for nosuch://"):
        store.check("nosuch://bucket/run")
    with pytest.raises(StoreError, match="names no bucket"):
        store.check("s3://")
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    forget_clients()
    try:
        with pytest.raises(StoreError, match="cannot be reached") as err:
            store.check(f"s3://{BUCKET}/elsewhere")
        assert "\n" not in str(err.value)
    finally:
        forget_clients()


def test_commands_say_in_one_line_what_a_store_needs(s3, capsys, monkeypatch):
    """`desctune run` on a store wants a registry every worker shares; `serve` keeps its folder local."""
    from app.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--set", f"artifacts_dir=s3://{BUCKET}/run", "--set", f"data.path={SAMPLE}"]) == 2
    assert main(["serve", "--artifacts-dir", f"s3://{BUCKET}/run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "set MLFLOW_TRACKING_URI" in lines[0] and "serve keeps its logs" in lines[1]


# A worker: `desctune run` with each of the argument lists it is given, one after the other in one process, each
# followed by the task states of the flow run it made, read from the worker's own Prefect database.
WORKER = """
import asyncio, json, sys
from app.cli import main
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort

async def states():
    async with get_client() as client:
        [run] = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}

for args in json.loads(sys.argv[1]):
    if main(args) != 0:
        sys.exit(1)
    print("STATES " + json.dumps(asyncio.run(states())), flush=True)
"""


def profile(model_dir: Path) -> str:
    return json.dumps({
        "artifacts_dir": f"s3://{BUCKET}/run",
        "data": {"path": "records.jsonl", "val_fraction": 0.15, "test_fraction": 0.15},
        "model": {"name": str(model_dir), "max_seq_len": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 2,
                  "logging_steps": 2, "num_workers": 0},
        "eval": {"limit": 4, "batch_size": 4, "max_new_tokens": 8},
        "registry": {"model_name": "tiny-shared"},
    })


def run_worker(name: str, tmp: Path, s3: dict, *runs: list[str]) -> list[tuple[dict, str]]:
    """`desctune run` once per list of overrides, in worker `name`'s own folder, with its own local cache and Prefect
    database; (task states, printed summary) of each run."""
    work = tmp / name / "checkout"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp / "records.jsonl", work / "records.jsonl")
    home = tmp / name / "prefect"
    env = {k: v for k, v in SESSION_ENV.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DESCTUNE_"))}
    env.update(s3)
    env.update({
        "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DESCTUNE_LOCAL_CACHE": str(tmp / name / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",  # the registry every worker shares
    })
    args = [["run", "--config", str(tmp / "profile.yaml"), *[a for o in run for a in ("--set", o)]] for run in runs]
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results, printed = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("STATES "):
            results.append((json.loads(line.removeprefix("STATES ")), "\n".join(printed)))
            printed = []
        else:
            printed.append(line)
    assert len(results) == len(runs), proc.stdout[-4000:]
    return results


def two_workers(tmp: Path, s3: dict, model_dir: Path) -> tuple:
    """Worker A runs once; worker B, with the store A filled, runs the same and then with a LoRA-only change
    (conftest.py's `store_runs_started` begins this ahead of this module's tests)."""
    head_records(SAMPLE, tmp / "records.jsonl", 40)
    (tmp / "profile.yaml").write_text(profile(model_dir))
    [first] = run_worker("worker-a", tmp, s3, [])
    second, lora_only = run_worker("worker-b", tmp, s3, [], ["lora.r=4"])
    return tmp, first, second, lora_only


@pytest.fixture(scope="module")
def shared_runs(s3, store_runs_started):
    return store_runs_started.result()


def test_a_second_worker_takes_every_stage_from_the_store(shared_runs):
    tmp, (first, _), (second, summary), _ = shared_runs
    assert {s: first[s] for s in STAGES} == {s: "Completed" for s in STAGES}
    assert {s: second[s] for s in STAGES} == {s: "Cached" for s in STAGES}
    assert second["register"] == "Completed" and "unchanged: version 1" in summary
    [adapter] = [ln.split()[1] for ln in summary.splitlines() if ln.startswith("adapter ")]
    assert adapter.startswith(f"s3://{BUCKET}/run/stages/train-")
    # worker B trained nothing: the adapter its register step logged, it fetched from the store
    folder = "/".join(adapter.split("/")[-3:])
    [fetched] = (tmp / "worker-b" / "cache").glob(f"*/{folder}/adapter_model.safetensors")
    [trained] = (tmp / "worker-a" / "cache").glob(f"*/{folder}/adapter_model.safetensors")
    assert fetched.read_bytes() == trained.read_bytes()


def test_a_lora_only_change_recomputes_only_train_and_evaluate(shared_runs):
    _, _, _, (states, summary) = shared_runs
    assert {s for s in STAGES if states[s] != "Cached"} == {"train", "evaluate"}
    assert states["register"] == "Completed" and "version 2" in summary


def test_the_store_holds_stages_results_and_mlflow_artifacts(shared_runs):
    from desctune import store

    objects = keys("run/")
    markers = {k.split("/")[2].rsplit("-", 1)[0] for k in objects if k.endswith("/" + store.MARKER)}
    assert markers == set(STAGES)
    assert sum(k.endswith("/" + store.MARKER) for k in objects) == len(STAGES) + 2  # train, evaluate twice
    assert any(k.startswith("run/prefect-results/") for k in objects)
    assert any(k.startswith("run/mlruns/") and k.endswith("adapter_model.safetensors") for k in objects)
