"""MLflow wiring: where the tracking store is, and the one run each flow run logs into."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from desctune import localui
from desctune.config import Config
from desctune.errors import ConfigError
from desctune.store import is_url, store_url

# MLflow 3's UI opens experiments in its GenAI view. The experiment says it is classic model development (the kind
# MLflow's own experiment-type selector sets), and every link desctune prints or publishes asks for the model-training
# view, since the UI keeps one view for all experiments (the browser's last choice, GenAI by default).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"
# scheme://user:password@rest, anywhere in a text: the password runs to the last "@" before the next blank (an
# unescaped "@" may be part of it).
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*):(?P<password>\S*)@(?P<rest>[^\s@]*)")
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&#\s]*")


def hide_password(text: str) -> str:
    """`text` (a URI, a command line) fit to print, log or store: the password of every URI in it, in its user part
    or a password= query field, becomes ***. The one masking function for every URI desctune shows or records."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\g<head>:***@\g<rest>", text))


def has_password(uri: str | None) -> bool:
    return bool(uri) and hide_password(uri) != uri


def public_config(cfg: Config) -> Config:
    """`cfg` as it may be shown and recorded: its tracking URI without a password."""
    uri = cfg.registry.tracking_uri
    if not has_password(uri):
        return cfg
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": hide_password(uri)})})


def without_userinfo(url: str) -> str:
    """An http(s) URL without its user:password@ part, for a browser link."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1", url)


def tracking_uri(cfg: Config) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the artifacts folder (the registry needs a database).
    An object-store artifacts_dir is shared by several workers, so it needs a tracking store they share as well."""
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_url(cfg.artifacts_dir):
        raise ConfigError(f"artifacts_dir {cfg.artifacts_dir} is an object store, shared by workers, but the MLflow "
                          "registry would be a SQLite file on this machine: set MLFLOW_TRACKING_URI (a tracking "
                          "server or database every worker reaches) or registry.tracking_uri")
    return f"sqlite:///{Path(cfg.artifacts_dir).resolve() / 'mlflow.db'}"


MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@contextlib.contextmanager
def logged_in(env: dict) -> Iterator[None]:
    """Inside the block MLflow's clients log in with the user and password `env` holds (none when it holds none):
    they read them from this process's environment, which is restored afterwards."""
    saved = {k: os.environ.get(k) for k in MLFLOW_LOGIN}
    for key in MLFLOW_LOGIN:
        if env.get(key):
            os.environ[key] = env[key]
        else:
            os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(cfg_or_uri: Config | str) -> MlflowClient:
    """A client for the store, also made mlflow's current one; the user's environment is left as it was, because
    mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI and every later config would silently reuse this store."""
    uri = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(uri, registry_uri=uri)


def experiment_id(cfg: Config) -> str:
    """Get or create the experiment. Unless a tracking server or MLFLOW_DEFAULT_ARTIFACT_ROOT decides, its artifacts
    go under artifacts_dir's mlruns/ whatever the store (SQLite, PostgreSQL, MySQL...): left to MLflow, a database
    store puts them in ./mlruns of whatever folder the command ran in."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    uri, location = tracking_uri(cfg), None
    if (os.environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT") or uri.startswith(("http:", "https:", "databricks", "file:"))
            or "://" not in uri):  # a server, or a file store (which keeps its artifacts beside its runs)
        pass
    elif is_url(cfg.artifacts_dir):
        location = store_url(cfg.artifacts_dir) + "/mlruns"
    else:
        location = (Path(cfg.artifacts_dir).resolve() / "mlruns").as_uri()
    try:
        return c.create_experiment(cfg.registry.experiment, artifact_location=location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        return c.get_experiment_by_name(cfg.registry.experiment).experiment_id


def ui_base(cfg: Config) -> str:
    """The MLflow UI that shows this store: the tracking server itself, else `desctune ui`'s MLflow UI
    (`desctune.localui`: http://127.0.0.1:5000 unless DESCTUNE_UI_MLFLOW_PORT says otherwise)."""
    uri = tracking_uri(cfg)
    return (without_userinfo(uri) if uri.startswith("http") else localui.url("mlflow")).rstrip("/")


def run_url(cfg: Config, run_id: str) -> str:
    """The run's page in the MLflow UI, in its model-training view."""
    return f"{ui_base(cfg)}/#/experiments/{experiment_id(cfg)}/runs/{run_id}?{TRAINING_VIEW}"


def mlflow_sink(run_id: str | None, uri: str | None) -> tuple[Callable[[dict], None], Callable[[dict, int], None]]:
    """(log_params, log_metrics) for training: the plan as `train_plan.*` params, then metrics at a step, each one
    batched call into the MLflow run; both do nothing without a run."""
    if not (run_id and uri):
        return (lambda params: None), (lambda metrics, step: None)
    from mlflow.entities import Metric, Param

    c = client(uri)

    def log_params(params: dict) -> None:
        c.log_batch(run_id, params=[Param(f"train_plan.{k}", str(v)) for k, v in params.items()])

    def log_metrics(metrics: dict, step: int) -> None:
        ts = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    return log_params, log_metrics
