"""`desctune serve` for real on loopback, once on PostgreSQL (fresh databases, dropped after) and once on its SQLite
defaults: deployments as prefect.yaml says, two identical `finetune` runs triggered at once through the Prefect API,
the model versions, aliases and Prefect artifacts they leave, a second `serve` refused, Ctrl-C leaving no process."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, SAMPLE, free_port, head_records, tiny_config
from desctune.config import load_config

READY_TIMEOUT = 240
RUN_TIMEOUT = 240
PG = dict(host="127.0.0.1", port=5432, user="postgres")


@contextmanager
def postgres_databases(n: int):
    """Fresh databases for one test module, dropped afterwards even if their servers still hold connections."""
    import psycopg2

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 (.ci/run starts it): {exc}".splitlines()[0])
    conn.autocommit = True
    names = [f"desctune_test_{uuid.uuid4().hex[:10]}" for _ in range(n)]
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f"CREATE DATABASE {name}")
        yield names
    finally:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


class Served:
    """A running `desctune serve` subprocess and where it listens."""

    def __init__(self, tmp: Path, env: dict):
        self.artifacts = tmp / "artifacts"
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = env
        self.argv = [sys.executable, "-m", "desctune.cli", "serve", "--prefect-port", str(self.prefect_port),
                     "--mlflow-port", str(self.mlflow_port), "--artifacts-dir", str(self.artifacts)]
        self.proc = subprocess.Popen(self.argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if line.startswith("desctune serve: ready"):
                return
        self.stop()
        pytest.fail(f"desctune serve did not get ready: {''.join(self.output)[-2000:]}")

    def family(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                for p in self.family():
                    p.kill()
        return self.proc.wait()


def serve_env(backend: str, home: Path, databases: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="1")
    if backend == "postgresql":
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{databases[0]}"
        env["MLFLOW_BACKEND_STORE_URI"] = f"postgresql://postgres@127.0.0.1:5432/{databases[1]}"
    return env


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    with postgres_databases(2 if request.param == "postgresql" else 0) as dbs:
        stack = Served(tmp, serve_env(request.param, tmp / "prefect-home", dbs))
        stack.backend = request.param
        stack.wait_ready(READY_TIMEOUT)
        yield stack
        stack.stop()


async def read_deployment(api_url: str, name: str):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await client.read_deployment_by_name(name)


async def trigger_and_wait(api_url: str, name: str, parameters: dict, n: int) -> list:
    """Create n flow runs of a deployment at once, then poll until every one is final."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        deployment = await client.read_deployment_by_name(name)
        runs = [await client.create_flow_run_from_deployment(deployment.id, parameters=parameters) for _ in range(n)]
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            runs = [await client.read_flow_run(r.id) for r in runs]
            if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(1)


async def run_details(api_url: str, flow_run_id) -> tuple[set[str], dict[str, str]]:
    """Artifact keys and task states (by task name) of one flow run."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    async with PrefectClient(api_url) as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key for a in artifacts if a.key}, {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}


def test_deployments_carry_the_profiles_the_schedules_and_the_servers(served):
    finetune = asyncio.run(read_deployment(served.api_url, "finetune/finetune"))
    assert finetune.parameters["config"] == json.loads(load_config(ROOT / "configs/cpu.yaml").model_dump_json())
    assert "config" in finetune.parameter_openapi_schema["properties"]
    assert finetune.work_pool_name == "desctune-local" and not finetune.schedules
    env = finetune.job_variables["env"]
    assert env["MLFLOW_TRACKING_URI"] == served.mlflow_url
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(served.artifacts / "prefect-results")
    assert finetune.job_variables["working_dir"] == str(ROOT)
    weekly = asyncio.run(read_deployment(served.api_url, "finetune/retrain-weekly"))
    gpu = json.loads(load_config(ROOT / "configs/gpu-tinyllama.yaml").model_dump_json())
    assert weekly.parameters["config"] == gpu
    assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]


def test_a_second_serve_says_it_is_already_running(served):
    again = subprocess.run(served.argv, env=served.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already running" in again.stderr
    assert str(served.proc.pid) in again.stderr


def test_two_identical_runs_at_once_complete_share_one_adapter_and_register_two_versions(served, tiny_model_dir, tmp_path):
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 30)
    cfg = tiny_config(
        tmp_path, tiny_model_dir, records,
        data={"val_fraction": 0.15, "test_fraction": 0.15},
        registry={"model_name": f"tiny-{served.backend}"},
    )
    runs = asyncio.run(trigger_and_wait(served.api_url, "finetune/finetune", {"config": json.loads(cfg.model_dump_json())}, 2))
    assert [r.state.name for r in runs] == ["Completed", "Completed"], served.artifacts / "serve-logs" / "worker.log"

    client = MlflowClient(served.mlflow_url, registry_uri=served.mlflow_url)
    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert len(versions) == 2
    assert {v.tags["prefect.flow_run_id"] for v in versions} == {str(r.id) for r in runs}
    assert len({v.tags["adapter_sha256"] for v in versions}) == 1
    challenger = client.get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert challenger.version in {v.version for v in versions}
    for v in versions:
        assert client.get_run(v.run_id).info.status == "FINISHED"

    trains = list((Path(cfg.artifacts_dir) / "stages").glob("train-*/adapter"))
    assert len(trains) == 1 and (trains[0] / "adapter_model.safetensors").is_file()
    for split in Path(cfg.artifacts_dir).glob("stages/sample-*/*.parquet"):
        assert len(pd.read_parquet(split)) > 0
    trained = 0
    for run in runs:
        keys, states = asyncio.run(run_details(served.api_url, run.id))
        assert {"evaluation", "mlflow-run"} <= keys
        assert states["register"] == "Completed"
        trained += states["train"] == "Completed"
    assert trained >= 1


def test_ctrl_c_stops_every_process_it_started(served):
    family = served.family()
    assert len(family) >= 4
    assert served.stop() == 0
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive
    for port in (served.prefect_port, served.mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not (served.artifacts / "serve.json").exists()


def test_prefect_yaml_parameters_are_the_profiles_and_missing_entrypoints_are_skipped(tmp_path):
    from deployments.deploy import deployable, load_spec

    spec = load_spec()
    by_name = {d["name"]: d for d in spec["deployments"]}
    for name, profile in (("finetune", "cpu.yaml"), ("retrain-weekly", "gpu-tinyllama.yaml")):
        expected = json.loads(load_config(ROOT / "configs" / profile).model_dump_json())
        assert by_name[name]["parameters"]["config"] == expected
    assert by_name["evaluate-champion"]["entrypoint"] == "flows/evaluate_champion.py:evaluate_champion"
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "finetune.py").write_text("")
    assert deployable(spec, tmp_path) == (["finetune", "retrain-weekly"], ["evaluate-champion"])


def test_a_run_that_waited_for_the_same_stage_reuses_the_holders_result(tmp_path):
    from filelock import FileLock

    from desctune.stagelock import RESULT, exclusive

    out = tmp_path / "stages" / "train-abc"
    holder = FileLock(str(out) + ".lock")
    holder.acquire()
    got: list[dict] = []
    waiter = threading.Thread(target=lambda: got.append(exclusive(out, lambda: {"computed": "by the waiter"})))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not got
    out.mkdir(parents=True)
    (out / RESULT).write_text(json.dumps({"computed": "by the holder"}))
    holder.release()
    waiter.join(10)
    assert got == [{"computed": "by the holder"}]
    assert exclusive(out, lambda: {"computed": "again"}) == {"computed": "again"}
