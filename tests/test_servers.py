"""`desctune serve` for real on loopback, once on PostgreSQL (fresh databases, dropped after) and once on its SQLite
defaults: deployments as prefect.yaml says, two identical `finetune` runs triggered at once through the Prefect API,
the model versions, aliases and Prefect artifacts they leave, a second `serve` refused, Ctrl-C leaving no process.
On SQLite only: a run whose worker and process are killed -9 is marked Crashed by the automation (it waits for the
heartbeats to stop); a run whose worker alone is killed -9 stops itself and reports Crashed at once; serve starts a
new worker, and the same parameters again take the cache and resume training. Both runs are killed by one kill -9 of
the worker before the module's other tests, which run while a thread waits for the crashed run to be marked (the
automation's window) and runs both again.

Both stacks are the session's (conftest.py's `sqlite_stack` and `postgresql_stack`, started ahead of these tests while
others run); the SQLite one is shared with tests/test_ui_browser.py, so its Ctrl-C test runs last in the session.
Every wait on a state has a limit sized for two loaded cores and says what was pending."""

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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, SAMPLE, SESSION_ENV, free_port, head_records, process_family, tiny_config
from desctune.config import load_config

READY_TIMEOUT = 300
RUN_TIMEOUT = 900  # a tiny finetune run takes a minute on two quiet cores; a loaded machine has needed over 4
MAX_STEPS = 600  # of a run killed mid-training (start_run)
CRASH_TIMEOUT = 300  # kill to Crashed: the automation acts CRASH_WINDOW after the last heartbeat, if the server keeps up
CRASH_WINDOW = 45  # seconds without a heartbeat (they come every 30 s, Prefect's minimum) before a run is Crashed
# Waits for the killed runs to be final and runs them again while the module's other tests run (`killing`).
WATCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="watch")
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

    def __init__(self, tmp: Path, env: dict, args: tuple[str, ...] = ()):
        self.artifacts = tmp / "artifacts"
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = env
        self.argv = [sys.executable, "-m", "app.cli", "serve", "--prefect-port", str(self.prefect_port),
                     "--mlflow-port", str(self.mlflow_port), "--artifacts-dir", str(self.artifacts), *args]
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

    def new_output(self) -> str:
        """Everything serve printed so far (stdout and stderr)."""
        while True:
            try:
                self.output.append(self.lines.get_nowait())
            except queue.Empty:
                return "".join(self.output)

    def worker(self) -> psutil.Process | None:
        for p in self.family():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd[1:5] == ["-m", "prefect", "worker", "start"]:
                return p
        return None

    def family(self) -> list[psutil.Process]:
        return process_family(self.proc.pid)

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
    env = {k: v for k, v in SESSION_ENV.items() if k not in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="1")
    env.pop("DESCTUNE_HEARTBEAT_SECONDS", None)
    env.pop("DESCTUNE_HEARTBEAT_WINDOW_SECONDS", None)
    if backend == "sqlite":
        env["DESCTUNE_HEARTBEAT_WINDOW_SECONDS"] = str(CRASH_WINDOW)
    if backend == "postgresql":
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{databases[0]}"
        env["MLFLOW_BACKEND_STORE_URI"] = f"postgresql://postgres@127.0.0.1:5432/{databases[1]}"
    return env


def start_serve(tmp: Path, backend: str, databases: list[str]) -> Served:
    env = serve_env(backend, tmp / "prefect-home", databases)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the test session's WARNING would hide the runs' progress lines
    stack = Served(tmp, env)
    stack.backend = backend
    stack.wait_ready(READY_TIMEOUT)
    return stack


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request):
    """The session's stack on this backend (conftest.py starts both ahead); the Ctrl-C test stops each."""
    return request.getfixturevalue(f"{request.param}_stack")


async def read_deployment(api_url: str, name: str):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await client.read_deployment_by_name(name)


async def trigger_and_wait(api_url: str, name: str, parameters: dict | list[dict], n: int = 1) -> list:
    """Create n flow runs of a deployment at once (or one per parameters of a list), then wait until every one is
    final; fails naming the runs and tasks still pending after RUN_TIMEOUT."""
    from prefect.client.orchestration import PrefectClient

    each = parameters if isinstance(parameters, list) else [parameters] * n
    async with PrefectClient(api_url) as client:
        deployment = await client.read_deployment_by_name(name)
        runs = [await client.create_flow_run_from_deployment(deployment.id, parameters=p) for p in each]
        return await wait_final(client, runs, RUN_TIMEOUT)


async def wait_runs(api_url: str, runs: list) -> list:
    """The flow runs once all are final (see wait_final)."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await wait_final(client, runs, RUN_TIMEOUT)


async def wait_final(client, runs: list, timeout: float) -> list:
    """The flow runs once all are final; fails after `timeout` s naming those pending and their unfinished tasks."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = [await client.read_flow_run(r.id) for r in runs]
        pending = [r for r in runs if not r.state.is_final()]
        if not pending:
            return runs
        if time.monotonic() > deadline:
            said = []
            for r in pending:
                tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
                unfinished = [f"{t.name} {t.state.name}" for t in tasks if not t.state.is_final()]
                said.append(f"{r.name} ({r.id}) {r.state.name}, tasks not final: {unfinished or 'none'}")
            pytest.fail(f"{len(pending)} of {len(runs)} flow run(s) not final after {timeout:.0f} s: {'; '.join(said)}")
        await asyncio.sleep(1)


async def create_run(api_url: str, name: str, parameters: dict):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        deployment = await client.read_deployment_by_name(name)
        return await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)


async def read_run(api_url: str, flow_run_id):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await client.read_flow_run(flow_run_id)


async def read_pool_template(api_url: str) -> dict:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return (await client.read_work_pool("desctune-local")).base_job_template


async def read_automations(api_url: str, name: str) -> list:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await client.read_automations_by_name(name)


def automations_as_stored(api_url: str, name: str) -> list[dict]:
    """The automations of that name as the API returns them (the client's models leave out their triggers' ids)."""
    from prefect.client.orchestration import PrefectClient

    async def read() -> list[dict]:
        async with PrefectClient(api_url) as client:
            body = {"automations": {"name": {"any_": [name]}}}
            return (await client.request("POST", "/automations/filter", json=body)).json()

    return asyncio.run(read())


async def run_details(api_url: str, flow_run_id) -> tuple[set[str], dict[str, str]]:
    """Artifact keys and task states (by task name) of one flow run."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    async with PrefectClient(api_url) as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key for a in artifacts if a.key}, {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}


def test_serve_starts_a_new_worker_when_its_worker_is_killed_mid_training(sqlite_served, killing):
    """First of the module's tests, so that the tests after it run while the run killed with the worker waits out
    the automation's window (`kills` waits for both runs)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while "starting a new one" not in (said := sqlite_served.new_output()[killing.said_before:]):
        assert time.monotonic() < deadline, f"serve did not start a new worker {READY_TIMEOUT} s after the kill: {said}"
        time.sleep(1)
    assert "worker exited with code -9" in said
    assert sqlite_served.worker() is not None and sqlite_served.worker().pid != killing.worker.pid


def test_deployments_carry_the_profiles_the_schedules_and_the_servers(served):
    finetune = asyncio.run(read_deployment(served.api_url, "finetune/finetune"))
    assert finetune.parameters["config"] == load_config(ROOT / "configs/cpu.yaml").model_dump(mode="json", exclude_none=True)
    assert "config" in finetune.parameter_openapi_schema["properties"]
    assert finetune.work_pool_name == "desctune-local" and not finetune.schedules
    assert not finetune.job_variables  # the pool's template pins them (deployments/process-job-template.json)
    job = asyncio.run(read_pool_template(served.api_url))["job_configuration"]
    env = job["env"]
    assert env["MLFLOW_TRACKING_URI"] == served.mlflow_url
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(served.artifacts / "prefect-results")
    assert job["working_dir"] == str(ROOT)
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30" and "desctune" in finetune.tags
    [automation] = asyncio.run(read_automations(served.api_url, "desctune-crashed-runs"))
    window = CRASH_WINDOW if served.backend == "sqlite" else 90
    assert automation.enabled and automation.trigger.within.total_seconds() == window
    assert automation.actions[0].message.startswith(f"No heartbeat for {window} s:")
    weekly = asyncio.run(read_deployment(served.api_url, "finetune/retrain-weekly"))
    gpu = load_config(ROOT / "configs/gpu-tinyllama.yaml").model_dump(mode="json", exclude_none=True)
    assert weekly.parameters["config"] == gpu
    assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]


def test_a_second_serve_says_it_is_already_running(served):
    again = subprocess.run(served.argv, env=served.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already running" in again.stderr
    assert str(served.proc.pid) in again.stderr


def test_two_identical_runs_at_once_complete_share_one_adapter_and_register_one_version(served, tiny_model_dir, tmp_path):
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 30)
    cfg = tiny_config(
        tmp_path, tiny_model_dir, records,
        data={"val_fraction": 0.15, "test_fraction": 0.15},
        registry={"model_name": f"tiny-{served.backend}"},
    )
    runs = asyncio.run(trigger_and_wait(served.api_url, "finetune/finetune", {"config": json.loads(cfg.model_dump_json())}, 2))
    assert [r.state.name for r in runs] == ["Completed", "Completed"], served.artifacts / "serve-logs" / "worker.log"

    client = MlflowClient(served.mlflow_url, registry_uri=served.mlflow_url)
    ours = {str(run.id) for run in runs}
    [version] = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert version.tags["prefect.flow_run_id"] in ours
    assert client.get_model_version_by_alias(cfg.registry.model_name, "challenger").version == version.version
    experiment = client.get_experiment_by_name(cfg.registry.experiment).experiment_id
    # The experiment is the stack's: other tests' runs (the killed runs run again, say) register into it too.
    mlflow_runs = [r for r in client.search_runs([experiment], filter_string="tags.`desctune.model_version` != ''")
                   if r.data.tags.get("prefect.flow_run_id") in ours]
    assert len(mlflow_runs) == 2 and all(r.info.status == "FINISHED" for r in mlflow_runs)
    assert {r.data.tags["desctune.model_version"] for r in mlflow_runs} == {f"{cfg.registry.model_name}/1"}

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


def test_deploying_again_keeps_one_crashed_runs_automation(served):
    from deployments.deploy import deploy, deploy_env

    if served.backend != "sqlite":
        pytest.skip("one backend is enough: deploying runs `prefect deploy` again")
    [before] = automations_as_stored(served.api_url, "desctune-crashed-runs")
    env = {**served.env, "PREFECT_API_URL": served.api_url}
    deploy(deploy_env(env, ROOT, served.artifacts, served.mlflow_url))
    [after] = automations_as_stored(served.api_url, "desctune-crashed-runs")
    assert after["id"] == before["id"] and after["trigger"]["within"] == before["trigger"]["within"]
    # Left as it was: a rewrite gives the trigger a new id, and the server keeps what a trigger waits for (the runs
    # whose heartbeats stopped) under its id, so a run dead before the deploy would never be marked Crashed.
    assert after["trigger"]["id"] == before["trigger"]["id"]


def flow_run_tree(worker: psutil.Process, flow_run_id) -> list[psutil.Process]:
    """The process(es) the worker started for this flow run (in their own session) and everything under them."""
    found = []
    for p in worker.children(recursive=True):
        try:
            if p.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                found += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    return list({p.pid: p for p in found}.values())


def wait_for_checkpoint(served: Served, artifacts: Path, flow_run_id, timeout: float) -> Path:
    deadline, checked = time.monotonic() + timeout, 0.0
    while True:
        found = list(artifacts.glob("stages/train-*/checkpoints/checkpoint-*"))
        if found:
            return found[0]
        if time.monotonic() - checked > 2:
            checked = time.monotonic()
            state = asyncio.run(read_run(served.api_url, flow_run_id)).state
            assert not state.is_final(), f"the run ended before its first checkpoint: {state.name} {state.message}"
        assert time.monotonic() < deadline, f"no checkpoint within {timeout:.0f} s; the run is {state.name}"
        time.sleep(0.1)


def wait_for_final(api_url: str, flow_run_id, timeout: float):
    """The flow run once it is final; fails naming its state and unfinished tasks after `timeout` s."""
    from prefect.client.orchestration import PrefectClient

    async def wait():
        async with PrefectClient(api_url) as client:
            [run] = await wait_final(client, [await client.read_flow_run(flow_run_id)], timeout)
            return run

    return asyncio.run(wait())


@pytest.fixture
def sqlite_served(served):
    if served.backend != "sqlite":
        pytest.skip("one backend is enough: killing a run's processes does not depend on the databases")
    return served


@dataclass
class MidTraining:
    """A `finetune` run at its first checkpoint."""

    parameters: dict
    run: object
    first: Path  # the checkpoint
    tree: list[psutil.Process]  # the run's processes under the worker
    environ: dict  # the environment of the first of them
    parent: int  # its parent's pid


@dataclass
class Killing:
    """Serve's worker killed -9 with two runs at their first checkpoints: `crash` had its process killed too,
    `orphan` was left to notice its worker gone."""

    worker: psutil.Process
    said_before: int  # how much serve had printed before the kill
    killed_at: float  # time.monotonic() of the kill
    crash: MidTraining
    orphan: MidTraining
    left: list[str]  # the orphan's processes still there after the wait for them to end
    stopped_after: float  # seconds from the kill until the orphan's processes were gone
    tracked: dict  # flow run id -> its MLflow run, read once its processes were gone, before any later run started
    then: Future | None = None  # of `watch_and_run_again`, begun as the kill is done


@dataclass
class Killed:
    """What became of a run killed mid-training, seen before the same run again started, and that run again."""

    mid: MidTraining
    left: list[str]  # its processes still there after the wait for them to end
    stopped_after: float  # seconds from the kill until its processes were gone
    final: object  # the flow run once final
    final_after: float  # seconds from the kill until then
    tracked: object  # its MLflow run, read once its processes were gone, before any later run started
    again: object  # the same run again, final


@dataclass
class Kills:
    """Both killed runs, each final and run again."""

    worker: psutil.Process  # the worker killed
    crash: Killed
    orphan: Killed


def start_run(served: Served, tiny_model_dir: Path, tmp_path: Path, model_name: str) -> tuple[dict, object]:
    """A `finetune` run of the tiny model, long enough to be killed mid-training: the kill comes at the first
    checkpoint (step 20) of both runs, and the MAX_STEPS - 20 steps after it outlast the seconds between the two
    runs' first checkpoints on a loaded machine too (each step slows alike; with one torch thread a step takes tens of
    milliseconds); the same run again trains them."""
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 30)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15},
                      train={"max_steps": MAX_STEPS, "save_steps": 20}, registry={"model_name": model_name})
    parameters = {"config": json.loads(cfg.model_dump_json())}
    return parameters, asyncio.run(create_run(served.api_url, "finetune/finetune", parameters))


def at_first_checkpoint(served: Served, parameters: dict, run) -> MidTraining:
    first = wait_for_checkpoint(served, Path(parameters["config"]["artifacts_dir"]), run.id, RUN_TIMEOUT)
    tree = flow_run_tree(served.worker(), run.id)
    assert tree, "no process of the flow run under the worker"
    return MidTraining(parameters, run, first, tree, tree[0].environ(), tree[0].ppid())


def tracked_run(served: Served, parameters: dict, run_id):
    """The MLflow run of Prefect flow run `run_id`."""
    mlflow = MlflowClient(served.mlflow_url)
    experiment = mlflow.get_experiment_by_name(parameters["config"]["registry"]["experiment"])
    [tracked] = mlflow.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
    return tracked


@pytest.fixture(scope="module")
def killing(served, tiny_model_dir, tmp_path_factory) -> Killing:
    """Two runs to their first checkpoints on serve's worker; the worker and the first run's processes killed -9
    (the worker first, so nothing is left to report that run's end), the second run's processes left to stop
    themselves. The first test of the module asks for it, so the other tests run while the crashed run waits out
    the automation's window; meanwhile a thread waits for both runs to be final and runs both again (`kills`)."""
    from app.serve import WORKER_MIN_UPTIME
    from tasks.watchdog import GRACE

    if served.backend != "sqlite":
        pytest.skip("one backend is enough: killing a run's processes does not depend on the databases")
    if "starting a new one" in served.new_output():  # serve stops if a restarted worker dies within a minute
        time.sleep(max(0.0, WORKER_MIN_UPTIME + 2 - (time.time() - served.worker().create_time())))
    started = [start_run(served, tiny_model_dir, tmp_path_factory.mktemp(name), f"tiny-{name}")
               for name in ("crash", "orphan")]
    crash, orphan = (at_first_checkpoint(served, parameters, run) for parameters, run in started)
    worker = served.worker()
    said_before = len(served.new_output())
    for p in [worker, *crash.tree]:
        p.kill()
    killed_at = time.monotonic()
    _, alive = psutil.wait_procs([worker, *crash.tree], timeout=30)
    assert not alive, f"still there 30 s after kill -9: {alive}"
    for mid in (crash, orphan):
        assert not (mid.first.parents[1] / "adapter").exists(), "training finished before the kill: raise max_steps"

    # SIGTERM ends the orphan through Prefect's crash handling (usually seconds; on two cores busy with both servers,
    # a run once needed more than 30 s), and GRACE after it the watchdog exits hard: that is the promise to check.
    _, alive = psutil.wait_procs(orphan.tree, timeout=GRACE + 15)
    left = [f"pid {p.pid} {p.status()}" for p in alive]
    for p in alive:  # serve no longer knows them: leave nothing behind
        p.kill()
    stopped_after = time.monotonic() - killed_at
    tracked = {mid.run.id: tracked_run(served, mid.parameters, mid.run.id) for mid in (crash, orphan)}
    killing = Killing(worker, said_before, killed_at, crash, orphan, left, stopped_after, tracked)
    killing.then = WATCH.submit(watch_and_run_again, served, killing)
    return killing


@pytest.fixture(scope="module")
def kills(killing) -> Kills:
    return killing.then.result()


def watch_and_run_again(served: Served, killing: Killing) -> Kills:
    """Each killed run watched until final (the crashed one waits for the automation: heartbeats every 30 s, window
    45 s), then run again as soon as it is; both runs again waited for."""
    observed, again = {}, []
    for mid in (killing.orphan, killing.crash):  # the orphan reports its own end: its run again starts first
        final = wait_for_final(served.api_url, mid.run.id, CRASH_TIMEOUT)
        observed[mid.run.id] = (final, time.monotonic() - killing.killed_at, killing.tracked[mid.run.id])
        again.append(asyncio.run(create_run(served.api_url, "finetune/finetune", mid.parameters)))
    orphan_again, crash_again = asyncio.run(wait_runs(served.api_url, again))
    return Kills(killing.worker,
                 Killed(killing.crash, [], killing.stopped_after, *observed[killing.crash.run.id], crash_again),
                 Killed(killing.orphan, killing.left, killing.stopped_after, *observed[killing.orphan.run.id],
                        orphan_again))


def assert_marked_failed_by_a_later_run(served: Served, tracked, tree: list) -> None:
    """A later run's start marked the MLflow run FAILED because the process of one of `tree` is gone."""
    tracked = MlflowClient(served.mlflow_url).get_run(tracked.info.run_id)
    assert tracked.info.status == "FAILED"
    assert tracked.data.tags["desctune.failed_because"] in {
        f"its process (pid {p.pid} on {socket.gethostname()}) is gone" for p in tree}


def assert_the_same_run_again_resumed(served: Served, killed: Killed) -> Path:
    """The run of the same parameters again completed, ingest -> tokenize Cached and training resumed from a
    checkpoint after the first; returns that checkpoint."""
    again, first = killed.again, killed.mid.first
    assert again.state.name == "Completed", (again.state.message, served.artifacts / "serve-logs" / "worker.log")
    _, states = asyncio.run(run_details(served.api_url, again.id))
    assert {k: states[k] for k in ("ingest", "clean", "sample", "tokenize")} == dict.fromkeys(
        ("ingest", "clean", "sample", "tokenize"), "Cached")
    assert states["train"] == "Completed"
    result = json.loads((first.parents[1] / "result.json").read_text())
    resumed = Path(result["resumed_from"])
    assert resumed.parent == first.parent and 20 <= int(resumed.name.split("-")[1]) < MAX_STEPS
    assert result["steps"] == MAX_STEPS and result["history"][-1]["step"] == MAX_STEPS
    return resumed


async def read_log_messages(api_url: str, flow_run_id) -> list[str]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with PrefectClient(api_url) as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_a_run_whose_worker_and_process_are_killed_is_marked_crashed_and_the_same_run_again_resumes(
        sqlite_served, kills):
    served, crash = sqlite_served, kills.crash
    assert crash.mid.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    crashed = crash.final
    assert crashed.state.name == "Crashed", (crashed.state.name, crashed.state.message)
    assert crashed.state.message.startswith(f"No heartbeat for {CRASH_WINDOW} s: the process running this flow run")
    assert crash.tracked.info.status == "RUNNING"  # no hook ran: the process was killed
    resumed = assert_the_same_run_again_resumed(served, crash)
    assert_marked_failed_by_a_later_run(served, crash.tracked, crash.mid.tree)
    print(f"crashed {crash.final_after:.0f} s after the kill; resumed from {resumed.name}")


def test_a_run_whose_worker_alone_is_killed_stops_itself_is_marked_crashed_and_the_same_run_again_resumes(
        sqlite_served, kills):
    from tasks.watchdog import GRACE, message

    served, orphan = sqlite_served, kills.orphan
    assert orphan.mid.environ["DESCTUNE_EXIT_WITH_WORKER"] == "1" and orphan.mid.parent == kills.worker.pid
    assert not orphan.left, f"the flow-run process outlived its worker by {GRACE + 15:.0f} s: {orphan.left}"
    # the run reports its own end (or, after the hard exit, the automation already has: its window is shorter)
    crashed = orphan.final
    assert crashed.state.name == "Crashed", (crashed.state.name, crashed.state.message)
    assert message(kills.worker.pid) in asyncio.run(read_log_messages(served.api_url, orphan.mid.run.id))
    # The flow's on_crashed hook marks the MLflow run FAILED before the process ends. On a 2-core AMD EPYC running
    # the whole suite the hook twice did not get to MLflow before the watchdog's hard exit (SQLite said "database is
    # locked" meanwhile; the cause is not pinned down); a later run's start then marks it, as after a kill -9, so
    # the MLflow run never stays RUNNING either way.
    hook_marked = orphan.tracked.info.status == "FAILED"
    resumed = assert_the_same_run_again_resumed(served, orphan)
    if hook_marked:
        assert MlflowClient(served.mlflow_url).get_run(orphan.tracked.info.run_id).info.status == "FAILED"
    else:
        assert_marked_failed_by_a_later_run(served, orphan.tracked, orphan.mid.tree)
    print(f"stopped {orphan.stopped_after:.1f} s after its worker was killed: {crashed.state.message}; MLflow run "
          f"marked FAILED by {'the on_crashed hook' if hook_marked else 'a later run'}; resumed from {resumed.name}")


def test_ctrl_c_stops_every_process_it_started(served):
    family = served.family()
    assert len(family) >= 4
    assert served.stop() == 0
    gone, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"60 s after serve exited: {[' '.join(p.cmdline()[:4]) for p in alive]}"
    for port in (served.prefect_port, served.mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not (served.artifacts / "serve.json").exists()


def test_prefect_yaml_parameters_are_the_profiles_and_missing_entrypoints_are_skipped(tmp_path):
    from deployments.deploy import deployable, load_spec

    spec = load_spec()
    by_name = {d["name"]: d for d in spec["deployments"]}
    for name, profile in (("finetune", "cpu.yaml"), ("finetune-smoke", "smoke.yaml"),
                          ("retrain-weekly", "gpu-tinyllama.yaml")):
        # None-valued fields are left out, so the UI's form opens them empty (they take the model's default, None)
        expected = load_config(ROOT / "configs" / profile).model_dump(mode="json", exclude_none=True)
        assert by_name[name]["parameters"]["config"] == expected
    smoke = load_config(ROOT / "configs" / "smoke.yaml")  # a quick try, registered apart from the real model
    assert smoke.train.max_steps <= 10 and smoke.eval.limit <= 10 and not by_name["finetune-smoke"].get("schedules")
    assert smoke.registry.model_name != by_name["finetune"]["parameters"]["config"]["registry"]["model_name"]
    assert by_name["evaluate-champion"]["entrypoint"] == "flows/evaluate_champion.py:evaluate_champion"
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "finetune.py").write_text("")
    assert deployable(spec, tmp_path) == (["finetune", "finetune-smoke", "retrain-weekly"], ["evaluate-champion"])


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
    waiter.join(120)
    assert not waiter.is_alive(), "the waiter still waits for the lock 120 s after its release"
    assert got == [{"computed": "by the holder"}]
    assert exclusive(out, lambda: {"computed": "again"}) == {"computed": "again"}


def test_serve_starts_a_dead_worker_again_but_stops_on_one_that_keeps_dying(tmp_path):
    from app.serve import Processes, ServeError

    procs = Processes(tmp_path / "logs")
    argv, env = [sys.executable, "-c", "print('polled once, then gone')"], dict(os.environ)
    procs.start("worker", argv, env).wait(120)
    assert procs.revive("worker", argv, env, min_uptime=60)  # serve revives only a worker that had polled the pool
    procs.procs["worker"].wait(120)
    assert not procs.revive("worker", argv, env, min_uptime=60)  # the new one died within the minute
    with pytest.raises(ServeError, match="worker exited with code 0: polled once, then gone"):
        procs.check()
