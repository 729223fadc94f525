"""MLflow wiring: where the tracking store is, and the one run each flow run logs into."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from desctune.config import Config
from desctune.errors import ConfigError
from desctune.store import is_url, store_url

LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
# MLflow 3's UI opens experiments in its GenAI view. The experiment says it is classic model development (the kind
# MLflow's own experiment-type selector sets), and every link desctune prints or publishes asks for the model-training
# view, since the UI keeps one view for all experiments (the browser's last choice, GenAI by default).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


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
    """Get or create the experiment; with a local SQLite store its artifacts go under artifacts/mlruns, and with an
    object-store artifacts_dir under its mlruns/ (unless a tracking server or MLFLOW_DEFAULT_ARTIFACT_ROOT decides)."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if os.environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT"):
        pass
    elif is_url(cfg.artifacts_dir) and not tracking_uri(cfg).startswith(("http:", "https:", "databricks")):
        location = store_url(cfg.artifacts_dir) + "/mlruns"
    elif tracking_uri(cfg).startswith("sqlite:"):
        location = (Path(cfg.artifacts_dir).resolve() / "mlruns").as_uri()
    try:
        return c.create_experiment(cfg.registry.experiment, artifact_location=location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        return c.get_experiment_by_name(cfg.registry.experiment).experiment_id


def ui_base(cfg: Config) -> str:
    """The MLflow UI that shows this store: the tracking server itself, else a local `mlflow ui` on its default port."""
    uri = tracking_uri(cfg)
    return (uri if uri.startswith("http") else LOCAL_MLFLOW_UI).rstrip("/")


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
