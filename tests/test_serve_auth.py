"""`desctune serve` with credentials, for real on loopback: Prefect and MLflow refuse requests without them (and
Prefect a change without its CSRF token, both a foreign origin), the worker's flow run logs in to both and completes;
the pool's job template lets no run choose its command, environment or directory; the MLflow backend URI (with a
password in it) is on no process's command line and not in the worker's environment. Without credentials a
non-loopback --host is refused in one line before anything starts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, SESSION_ENV, free_port, head_records, tiny_config
from test_servers import READY_TIMEOUT, RUN_TIMEOUT, Served

USER, PASSWORD = "operator", "correct horse battery staple"
DB_PASSWORD = "db-secret-not-for-ps"  # PostgreSQL here trusts loopback, so any password connects


def call(url: str, method: str = "GET", body: dict | None = None, auth: str | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    """(status, response headers) of one plain HTTP request; `auth` is `user:password`."""
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def start_with_credentials(tmp: Path, db: str) -> Served:
    """`desctune serve` with credentials on PostgreSQL database `db`, ready (conftest.py starts it ahead)."""
    env = {k: v for k, v in SESSION_ENV.items()
           if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_", "MLFLOW_", "DESCTUNE_SERVE_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_WORKER_QUERY_SECONDS="1",
               DESCTUNE_SERVE_USER=USER, DESCTUNE_SERVE_PASSWORD=PASSWORD,
               MLFLOW_BACKEND_STORE_URI=f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:5432/{db}")
    stack = Served(tmp, env)
    stack.wait_ready(READY_TIMEOUT)
    return stack


@pytest.fixture(scope="module")
def served(auth_stack_started):
    stack = auth_stack_started.result()
    yield stack
    stack.stop()


def prefect_client(api_url: str, auth: str | None = f"{USER}:{PASSWORD}"):
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api_url, auth_string=auth)


async def run_deployment(api_url: str, parameters: dict):
    async with prefect_client(api_url) as client:
        deployment = await client.read_deployment_by_name("finetune/finetune")
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not run.state.is_final() and time.monotonic() < deadline:
            await asyncio.sleep(1)
            run = await client.read_flow_run(run.id)
        return run


def test_without_credentials_both_servers_refuse_and_the_workers_run_completes(served, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    from mlflow.tracking import MlflowClient

    api, mlflow = served.api_url, served.mlflow_url
    assert call(f"{api}/health")[0] == 200  # probes stay open
    for auth in (None, f"{USER}:wrong password!", f"nobody:{PASSWORD}"):
        assert call(f"{api}/work_pools/desctune-local", auth=auth)[0] == 401
        assert call(f"{api}/csrf-token?client=x", auth=auth)[0] == 401  # so no CSRF token either
        assert call(f"{api}/deployments/filter", "POST", {}, auth=auth)[0] in (401, 403)
        assert call(f"{mlflow}/api/2.0/mlflow/registered-models/search", auth=auth)[0] == 401
    assert call(f"{api}/work_pools/desctune-local", auth=f"{USER}:{PASSWORD}")[0] == 200
    assert call(f"{mlflow}/api/2.0/mlflow/registered-models/search", auth=f"{USER}:{PASSWORD}")[0] == 200
    # a change without Prefect's CSRF token is refused even with the password (a browser's forged form has none)
    assert call(f"{api}/deployments/filter", "POST", {}, auth=f"{USER}:{PASSWORD}")[0] == 403
    for url in (f"{api}/deployments/filter", f"{mlflow}/api/2.0/mlflow/registered-models/search"):
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        _, foreign = call(url, "OPTIONS", headers={"Origin": "http://attacker.example", **preflight})
        assert "Access-Control-Allow-Origin" not in foreign and "access-control-allow-origin" not in foreign
    own = f"http://127.0.0.1:{served.prefect_port}"
    _, allowed = call(f"{api}/deployments/filter", "OPTIONS", headers={"Origin": own, **preflight})
    assert {k.lower(): v for k, v in allowed.items()}["access-control-allow-origin"] == own

    records = head_records(SAMPLE, tmp_path / "records.jsonl", 30)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15},
                      registry={"model_name": "tiny-auth"})
    run = asyncio.run(run_deployment(api, {"config": json.loads(cfg.model_dump_json())}))
    assert run.state.name == "Completed", (run.state.message, served.artifacts / "serve-logs" / "worker.log")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    [version] = MlflowClient(mlflow, registry_uri=mlflow).search_model_versions("name = 'tiny-auth'")
    assert version.tags["prefect.flow_run_id"] == str(run.id)


def test_no_run_or_deployment_can_choose_the_workers_command_environment_or_directory(served):
    from prefect.exceptions import PrefectHTTPStatusError

    async def attempt(job_variables: dict) -> int:
        async with prefect_client(served.api_url) as client:
            deployment = await client.read_deployment_by_name("finetune/finetune")
            try:
                await client.create_flow_run_from_deployment(deployment.id, job_variables=job_variables)
            except PrefectHTTPStatusError as exc:
                return exc.response.status_code
            return 201

    async def pool_and_deployment():
        async with prefect_client(served.api_url) as client:
            pool = await client.read_work_pool("desctune-local")
            return pool.base_job_template, await client.read_deployment_by_name("finetune/finetune")

    template, deployment = asyncio.run(pool_and_deployment())
    assert set(template["variables"]["properties"]) == {"name", "labels", "stream_output", "gpus"}
    assert template["variables"]["additionalProperties"] is False
    assert "command" not in template["job_configuration"]
    assert template["job_configuration"]["working_dir"] == str(ROOT)
    assert template["job_configuration"]["env"]["MLFLOW_TRACKING_URI"] == served.mlflow_url
    assert not deployment.job_variables
    for job_variables in ({"command": "touch /tmp/pwned"}, {"env": {"PYTHONSTARTUP": "/tmp/x.py"}},
                          {"env.PYTHONSTARTUP": "/tmp/x.py"}, {"working_dir": "/tmp"}):
        assert asyncio.run(attempt(job_variables)) == 422, job_variables


def test_the_backend_uri_and_the_secrets_stay_off_command_lines_and_out_of_the_worker(served):
    family = served.family()
    cmdlines = [" ".join(p.cmdline()) for p in family]
    assert any(" mlflow server " in f" {c} " for c in cmdlines) and any("--app-name basic-auth" in c for c in cmdlines)
    for secret in (DB_PASSWORD, "postgresql://", PASSWORD, "mlflow.db", "mlruns"):
        assert not [c for c in cmdlines if secret in c], secret
    assert DB_PASSWORD not in served.new_output() and PASSWORD not in served.new_output()
    worker = served.worker().environ()
    assert worker["PREFECT_API_AUTH_STRING"] == f"{USER}:{PASSWORD}"
    assert (worker["MLFLOW_TRACKING_USERNAME"], worker["MLFLOW_TRACKING_PASSWORD"]) == (USER, PASSWORD)
    for server_only in ("MLFLOW_BACKEND_STORE_URI", "PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD",
                        "DESCTUNE_SERVE_PASSWORD", "PREFECT_API_DATABASE_CONNECTION_URL"):
        assert server_only not in worker, server_only
    [mlflow] = [p for p, c in zip(family, cmdlines) if c.split()[1:4] == ["-m", "mlflow", "server"]]
    assert DB_PASSWORD in mlflow.environ()["MLFLOW_BACKEND_STORE_URI"]


def serve_without_starting(argv: list[str], env: dict, artifacts) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "serve", *argv, "--artifacts-dir", str(artifacts)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("extra, message", [
    ({}, ("desctune: --host 0.0.0.0 would let anyone who reaches it run commands through Prefect and change the "
          "MLflow registry: set DESCTUNE_SERVE_PASSWORD (or DESCTUNE_SERVE_PASSWORD_FILE), at least 12 characters, "
          "and optionally DESCTUNE_SERVE_USER, or serve on 127.0.0.1")),
    ({"DESCTUNE_SERVE_PASSWORD": "short"},
     "desctune: the serve password must be at least 12 characters long (MLflow's rule)"),
])
def test_a_non_loopback_host_without_credentials_is_refused_in_one_line_before_anything_starts(tmp_path, extra,
                                                                                                message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESCTUNE_SERVE_")}
    prefect_port, mlflow_port = free_port(), free_port()
    done = serve_without_starting(["--host", "0.0.0.0", "--prefect-port", str(prefect_port), "--mlflow-port",
                                   str(mlflow_port)], {**env, **extra}, tmp_path / "artifacts")
    assert done.returncode == 2
    assert done.stderr == message + "\n" and not done.stdout
    assert not (tmp_path / "artifacts").exists()
    for port in (prefect_port, mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_credentials_come_from_the_environment_or_a_file(tmp_path):
    from app.serve_auth import credentials, is_loopback
    from desctune.errors import ServeError

    assert credentials({}) is None
    assert credentials({"DESCTUNE_SERVE_PASSWORD": PASSWORD}).auth_string == f"desctune:{PASSWORD}"
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    creds = credentials({"DESCTUNE_SERVE_PASSWORD_FILE": str(secret), "DESCTUNE_SERVE_USER": USER})
    assert creds.auth_string == f"{USER}:{PASSWORD}" and PASSWORD not in repr(creds)
    with pytest.raises(ServeError, match="not both"):
        credentials({"DESCTUNE_SERVE_PASSWORD": PASSWORD, "DESCTUNE_SERVE_PASSWORD_FILE": str(secret)})
    with pytest.raises(ServeError, match="no colon"):
        credentials({"DESCTUNE_SERVE_PASSWORD": PASSWORD, "DESCTUNE_SERVE_USER": "a:b"})
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "0.0.0.0", "10.0.0.5", "::")] == [
        True, True, True, True, False, False, False]


def test_the_job_template_pins_command_environment_and_directory():
    from prefect.utilities.schema_tools import validate

    from deployments.deploy import job_template

    template = job_template({"DESCTUNE_ARTIFACTS_DIR": "/srv/a", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
                             "DESCTUNE_HEARTBEAT_SECONDS": "30", "DESCTUNE_PROJECT_DIR": "/srv/desctune"})
    job, variables = template["job_configuration"], template["variables"]
    assert "command" not in job and job["working_dir"] == "/srv/desctune"
    assert job["env"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == "/srv/a/prefect-results"
    assert "{{" not in json.dumps(job["env"])
    assert not {"command", "env", "working_dir"} & set(variables["properties"])
    for override in ({"command": "id"}, {"env": {"A": "b"}}, {"env.A": "b"}, {"working_dir": "/"}):
        assert validate(override, variables, preprocess=True, ignore_required=True), override
    assert not validate({"stream_output": False, "name": "x"}, variables, preprocess=True, ignore_required=True)


def test_the_schedule_check_logs_in_as_the_runs_do_and_an_error_is_no_absent_champion(served, monkeypatch):
    """serve pauses the evaluate-champion schedule only when the registry says there is no champion: asked with the
    runs' credentials it finds one that exists, and a refusal is an error, not "no champion yet"."""
    from mlflow.tracking import MlflowClient

    from deployments.schedules import CheckFailed, alias_missing
    from desctune.config import Config

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)  # this process has no login of its own: only `env` has one
    cfg = Config.model_validate({"registry": {"model_name": "tiny-auth-schedule"}})
    env = {"MLFLOW_TRACKING_URI": served.mlflow_url, "MLFLOW_TRACKING_USERNAME": USER,
           "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    assert alias_missing(cfg, "champion", env).startswith("no tiny-auth-schedule@champion in the registry yet")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    mlflow = MlflowClient(served.mlflow_url, registry_uri=served.mlflow_url)
    run = mlflow.create_run(mlflow.create_experiment("schedule-check"))
    mlflow.create_registered_model("tiny-auth-schedule")
    version = mlflow.create_model_version("tiny-auth-schedule", f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    mlflow.set_registered_model_alias("tiny-auth-schedule", "champion", version.version)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")

    assert alias_missing(cfg, "champion", env) is None
    with pytest.raises(CheckFailed, match="401"):
        alias_missing(cfg, "champion", {"MLFLOW_TRACKING_URI": served.mlflow_url})


@pytest.mark.parametrize("argv, message", [
    (["--mlflow-port", "70000"], "desctune: --mlflow-port 70000: a port is a number from 1 to 65535"),
    (["--prefect-port", "-1"], "desctune: --prefect-port -1: a port is a number from 1 to 65535"),
])
def test_a_port_out_of_range_is_one_line_and_exit_2(tmp_path, argv, message):
    done = serve_without_starting(argv, dict(os.environ), tmp_path / "artifacts")
    assert (done.returncode, done.stderr, done.stdout) == (2, message + "\n", "")


def test_a_blank_password_is_refused():
    from app.serve_auth import credentials
    from desctune.errors import ServeError

    with pytest.raises(ServeError, match="only blanks"):
        credentials({"DESCTUNE_SERVE_PASSWORD": " " * 16})


def test_a_wildcard_bind_is_shown_and_handed_out_by_this_machines_name(tmp_path):
    from app.serve import banner, commands, make_plan

    plan = make_plan("0.0.0.0", 4200, 5000, tmp_path, {"DESCTUNE_SERVE_PASSWORD": PASSWORD})
    assert plan.mlflow_url == f"http://{socket.gethostname()}:5000"
    assert plan.api_url == f"http://{socket.gethostname()}:4200/api"
    worker_env = commands(plan, {"DESCTUNE_SERVE_PASSWORD": PASSWORD})["worker"][1]
    assert worker_env["MLFLOW_TRACKING_URI"] == plan.mlflow_url  # the lineage links the runs write use it
    assert "0.0.0.0" not in banner(plan, ["finetune"])


def test_a_deployment_patch_cannot_choose_the_workers_command_either(served):
    """PATCH /deployments/<id> with job variables the pool's template does not declare is refused (422) as a flow
    run's are, also when the PATCH does not name the work pool (Prefect checks only when it does)."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import PrefectHTTPStatusError

    async def patch(job_variables: dict):
        async with prefect_client(served.api_url) as client:
            deployment = await client.read_deployment_by_name("finetune/finetune")
            try:
                await client.update_deployment(deployment.id, DeploymentUpdate(job_variables=job_variables))
                status = 204
            except PrefectHTTPStatusError as exc:
                status = exc.response.status_code
            return status, (await client.read_deployment(deployment.id)).job_variables

    for job_variables in ({"command": "touch /tmp/pwned"}, {"env": {"PYTHONSTARTUP": "/tmp/x.py"}},
                          {"working_dir": "/tmp"}):
        assert asyncio.run(patch(job_variables)) == (422, {}), job_variables
    assert asyncio.run(patch({"stream_output": True})) == (204, {"stream_output": True})  # a declared one
    assert asyncio.run(patch({})) == (204, {})
