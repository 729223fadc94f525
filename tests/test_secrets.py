"""A tracking store's password never leaves the places the user put it: `desctune run` against a real PostgreSQL
role with a password, the URI given in each way a user can (MLFLOW_TRACKING_URI, --set, a profile), and then every
output, record and file the runs made searched for it."""

import secrets
import subprocess
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, SAMPLE, SESSION_ENV, head_records, tiny_config
from desctune.tracking import hide_password
from test_servers import PG

RUN_TIMEOUT = 900


@contextmanager
def postgres_role():
    """A PostgreSQL role with a password and a database it owns, both dropped afterwards: (URI, password)."""
    import psycopg2

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432: {exc}".splitlines()[0])
    conn.autocommit = True
    name, password = f"desctune_secret_{uuid.uuid4().hex[:10]}", "Pw-" + secrets.token_hex(12)
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
        cur.execute(f"CREATE DATABASE {name} OWNER {name}")
    try:
        yield f"postgresql://{name}:{password}@{PG['host']}:{PG['port']}/{name}", password
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(f"DROP ROLE IF EXISTS {name}")
        conn.close()


@dataclass
class Runs:
    """`desctune run` with the tracking URI given each way a user can: its output, and where the runs wrote."""

    uri: str
    password: str
    config: object  # the profile's Config, without the URI
    outputs: dict  # way -> subprocess.CompletedProcess
    home: Path  # PREFECT_HOME of the runs
    cwd: Path  # the folder the command ran in


def run_each_way(tmp_path: Path, tiny_model_dir: Path, uri: str, password: str) -> Runs:
    """The three runs, one after the other (conftest.py's `secret_runs_started` begins them ahead of this module)."""
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 40)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15},
                      registry={"model_name": "tiny-secret"})
    profile = cfg.model_dump(mode="json")
    plain, with_uri = tmp_path / "plain.yaml", tmp_path / "with-uri.yaml"
    plain.write_text(yaml.safe_dump(profile))
    with_uri.write_text(yaml.safe_dump({**profile, "registry": {**profile["registry"], "tracking_uri": uri}}))
    home, cwd = tmp_path / "prefect-home", tmp_path / "cwd"
    cwd.mkdir()
    base = {k: v for k, v in SESSION_ENV.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(ROOT))
    ways = {
        "MLFLOW_TRACKING_URI": ({**base, "MLFLOW_TRACKING_URI": uri}, ["--config", str(plain)]),
        "--set": (base, ["--config", str(plain), "--set", f"registry.tracking_uri={uri}"]),
        "a profile": (base, ["--config", str(with_uri)]),
    }
    outputs = {way: subprocess.run([sys.executable, "-m", "app.cli", "run", *args], env=env, cwd=cwd,
                                   capture_output=True, text=True, timeout=RUN_TIMEOUT)
               for way, (env, args) in ways.items()}
    return Runs(uri, password, cfg, outputs, home, cwd)


@pytest.fixture(scope="module")
def runs(secret_runs_started) -> Runs:
    return secret_runs_started.result()


def test_hide_password_masks_every_uri_in_a_text():
    assert hide_password("postgresql://u:p@ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert hide_password("x --set registry.tracking_uri=mysql+pymysql://u:pw@h/db?charset=utf8 -v") == (
        "x --set registry.tracking_uri=mysql+pymysql://u:***@h/db?charset=utf8 -v")
    assert hide_password("postgresql://h/db?sslmode=require&password=pw") == "postgresql://h/db?sslmode=require&password=***"
    for clear in ("postgresql://u@h/db", "sqlite:////tmp/a:b@c/mlflow.db", "http://127.0.0.1:5000"):
        assert hide_password(clear) == clear


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _database_rows_holding(database: str, needle: str) -> list[str]:
    """Every row of every table of the MLflow database, as text, that holds `needle`."""
    import psycopg2

    with psycopg2.connect(dbname=database, connect_timeout=5, **PG) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = [t for (t,) in cur.fetchall()]
        found = []
        for table in tables:
            cur.execute(f'SELECT t::text FROM "{table}" t')
            found += [f"{table}: {row[:200]}" for (row,) in cur.fetchall() if needle in row]
    return found


def test_no_output_record_or_file_of_a_run_holds_the_tracking_password(runs):
    uri, password, cfg, home, cwd = runs.uri, runs.password, runs.config, runs.home, runs.cwd
    for way, done in runs.outputs.items():
        assert done.returncode == 0, (way, done.stderr[-3000:])
        assert "registry   tiny-secret version" in done.stdout, way
        assert password not in done.stdout and password not in done.stderr, way
        assert "postgresql://" in done.stdout, way  # the summary names the store, masked

    client = MlflowClient(uri, registry_uri=uri)
    [experiment] = [e for e in client.search_experiments() if e.name == cfg.registry.experiment]
    assert experiment.artifact_location == (Path(cfg.artifacts_dir).resolve() / "mlruns").as_uri()
    tracked = client.search_runs([experiment.experiment_id])
    assert len(tracked) == 3
    for run in tracked:
        assert run.data.params["registry/tracking_uri"] in ("None", hide_password(uri))
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert password not in value, key
    for version in client.search_model_versions("name = 'tiny-secret'"):
        assert password not in (version.description or "") and password not in str(version.tags)
    assert not (cwd / "mlruns").exists()  # the artifacts went to artifacts_dir, not where the command ran
    database = uri.rsplit("/", 1)[1]
    assert _database_rows_holding(database, password) == []
    # The artifacts folder (MLflow's artifacts, reports, Prefect's stored results), Prefect's database (flow run
    # parameters, logs, artifacts, events) and the folder the command ran in.
    for root in (Path(cfg.artifacts_dir), home, cwd):
        assert _files_holding(root, password.encode()) == [], root
