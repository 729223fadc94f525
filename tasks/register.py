"""Register: the MLflow run that records a flow run, and the adapter as a model version with lineage.

Every registered version gets the alias `challenger`; `champion` moves to it only when it beats the base and the
current champion on the configured metric, measured on the same test set.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.data.meta_dataset import MetaDataset
from prefect import task

from desctune.config import Config, config_to_yaml
from desctune.errors import UserError, retry_unless_user_error
from desctune.tracking import client, experiment_id, run_url, tracking_uri

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion_history"
MAX_HISTORY = 50


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except Exception:
        return "unknown"


def prefect_context() -> dict:
    """The current Prefect flow run's id, name and UI link (empty outside a flow run)."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    if not flow_run.id:
        return {}
    ui = PREFECT_UI_URL.value() or "http://127.0.0.1:4200"
    return {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name or "",
            "prefect.flow_run_url": f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}"}


def version_url(cfg: Config, name: str, version: str) -> str:
    """The model version's page in the MLflow UI (the local `mlflow ui` for a SQLite store)."""
    uri = tracking_uri(cfg)
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/models/{name}/versions/{version}"


def start_run(cfg: Config) -> str:
    """Create the MLflow run of this flow run, with the config as params and the Prefect run as tags."""
    c = client(cfg)
    tags = {"desctune.config_hash": cfg.digest(), "desctune.git_commit": git_commit(), **prefect_context()}
    run = c.create_run(experiment_id(cfg), tags=tags, run_name=tags.get("prefect.flow_run_name") or None)
    params = flatten(json.loads(cfg.model_dump_json()))
    for key, value in params.items():
        c.log_param(run.info.run_id, key, str(value)[:6000])
    c.log_text(run.info.run_id, config_to_yaml(cfg), "config.yaml")
    return run.info.run_id


class CountedDataset(MetaDataset):
    """A dataset known by source, digest and row count only: for files too big to load just to log them."""

    def __init__(self, source, name: str, digest: str, rows: int):
        self._rows = rows
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return {"num_rows": self._rows}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def log_dataset(run_id: str, name: str, path: str, digest: str, context: str, rows: int | None = None,
                frame: pd.DataFrame | None = None) -> None:
    """mlflow.log_input with the file as source, its content hash as digest, and its row count."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    if frame is not None:
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:16])
    else:
        dataset = CountedDataset(source, name, digest[:16], rows)
    with mlflow.start_run(run_id=run_id, nested=False):
        mlflow.log_input(dataset, context=context)


def stage_metrics(stages: dict) -> dict:
    """The numbers every run logs: records per stage, split sizes, training and evaluation results."""
    ing, cln, spl, tok, trn, ev = (stages[k] for k in ("ingest", "clean", "sample", "tokenize", "train", "evaluate"))
    m = {
        "lines_read": ing["lines_read"], "records_ingested": ing["records"], "records_kept": cln["kept"],
        "records_rejected": cln["rejected"],
        "duplicates": cln.get("duplicates", 0),
        **{f"{s}_rows": spl[s]["rows"] for s in ("train", "val", "test")},
        "train_examples": tok["train"]["rows"], "train_tokens": tok["train"]["tokens"],
        "train_supervised_tokens": tok["train"]["supervised_tokens"],
        "val_loss": trn["val_loss"], "train_loss_mean": trn["train_loss_mean"],
        "train_tokens_per_s": trn["tokens_per_s"], "peak_memory_mb": trn["peak_memory_mb"],
        "train_seconds": trn["seconds"],
    }
    for reason, n in cln.get("by_reason", {}).items():
        m[f"rejected_{reason}"] = n
    for model in ("base", "finetuned"):
        for key in ("bleu", "rougeL"):
            m[f"{model}_{key}"] = ev["metrics"][model][key]
    m["eval_better"], m["eval_worse"], m["eval_same"] = (ev["metrics"][k] for k in ("better", "worse", "same"))
    return {k: float(v) for k, v in m.items() if v is not None}


def log_results(cfg: Config, run_id: str, stages: dict) -> None:
    """Metrics, lineage and report files of one flow run, into its MLflow run."""
    c = client(cfg)
    trained, evaluated = stages["train"], stages["evaluate"]
    for key, value in stage_metrics(stages).items():
        c.log_metric(run_id, key, value)
    if trained.get("mlflow_run_id") != run_id:
        for row in trained["history"]:
            c.log_metric(run_id, "train_loss", row["loss"], step=row["step"])
    ing, cln, spl = stages["ingest"], stages["clean"], stages["sample"]
    log_dataset(run_id, "raw", ing["input_path"], ing["input_sha256"], "raw", rows=ing["records"])
    log_dataset(run_id, "clean", cln["path"], cln["sha256"], "clean", rows=cln["kept"])
    for split in ("train", "test"):
        frame = pd.read_parquet(spl[split]["path"])
        log_dataset(run_id, split, spl[split]["path"], spl[split]["sha256"], split, frame=frame)
    reports = ("plot_path", "eval_path", "report_path", "metrics_path")
    for path in (trained.get("loss_plot"), *(evaluated.get(k) for k in reports), cln.get("rejects_path")):
        if path and Path(path).is_file():
            c.log_artifact(run_id, path, artifact_path="report")
    c.set_tag(run_id, "desctune.base_model", stages["base"]["name"])
    c.set_tag(run_id, "desctune.base_model_sha256", stages["base"]["sha256"])


def metric_of(version, key: str) -> float | None:
    value = version.tags.get(f"metric.{key}")
    return float(value) if value is not None else None


def should_promote(challenger: dict, base: dict, champion: float | None, key: str) -> bool:
    """Strictly better than the base and than the current champion (ties keep the champion)."""
    if challenger[key] <= base[key]:
        return False
    return champion is None or challenger[key] > champion


class RegistryError(UserError):
    """A model, version or alias the user named is not in the registry, or a move is impossible; one plain line."""


def current_user() -> str:
    """Who moves the champion by hand: $DESCTUNE_USER, else the login name."""
    return os.environ.get("DESCTUNE_USER") or getpass.getuser()


def get_alias(c, name: str, alias: str):
    """The model version behind an alias, or None."""
    try:
        return c.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def get_version(c, name: str, version: str):
    try:
        return c.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"the registry has no model {name} version {version}") from None


def champion_history(c, name: str) -> list[str]:
    """Versions that were champion, oldest first, the current one last (the registered model's tag)."""
    raw = c.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def record_change(c, name: str, version: str, action: str, who: str, why: str) -> None:
    """Who moved the champion, when and why: on the version and, as the last change, on the registered model."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in {"action": action, "by": who, "reason": why, "at": now}.items():
        c.set_model_version_tag(name, version, f"champion.{key}", value)
    c.set_registered_model_tag(name, "champion.last_change", f"{now} {action} version {version} by {who}: {why}")


def set_champion(c, name: str, version: str, who: str, why: str) -> None:
    """Move @champion to `version`, push it onto the champion history and record who and why."""
    current = get_alias(c, name, CHAMPION)
    history = champion_history(c, name)
    if current is not None and (not history or history[-1] != str(current.version)):
        history.append(str(current.version))
    version = str(version)
    history = [v for v in history if v != version][-(MAX_HISTORY - 1):] + [version]
    c.set_registered_model_alias(name, CHAMPION, version)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    record_change(c, name, version, "promote", who, why)


def rollback_champion(c, name: str, who: str, why: str) -> tuple[str, str]:
    """Move @champion back to the previous champion in the history; returns (from version, to version)."""
    current = get_alias(c, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    was = str(current.version)
    history = [v for v in champion_history(c, name) if v != was]
    while history and not c.search_model_versions(f"name = '{name}' and version_number = {history[-1]}"):
        history.pop()
    if not history:
        raise RegistryError(f"{name} has no previous champion to roll back to (the champion is version {was})")
    target = history[-1]
    c.set_registered_model_alias(name, CHAMPION, target)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    record_change(c, name, target, f"rollback from version {was} to", who, why)
    c.set_model_version_tag(name, was, "champion.rolled_back", f"by {who}: {why}")
    return was, target


def resolve_model(cfg: Config, ref: str) -> dict:
    """Name, version, run and local adapter folder of models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder."""
    from desctune.files import dir_sha256
    from desctune.modelref import resolve as resolve_ref

    found = resolve_ref(ref, tracking_uri(cfg), cfg.artifacts_dir)
    return {"ref": ref, "name": found.name, "version": found.version, "run_id": found.run_id, "label": found.label,
            "adapter_path": str(found.adapter_dir), "adapter_sha256": dir_sha256(found.adapter_dir)}


def champion_score(cfg: Config, champion, test: dict, eval_cfg) -> float | None:
    """The champion's metric on this run's test set: from its tags when it was measured there, else re-measured."""
    if champion is None:
        return None
    if champion.tags.get("data.test_sha256") == test["sha256"] and champion.tags.get("eval_config") == eval_cfg.digest():
        return metric_of(champion, f"finetuned_{cfg.registry.metric}")
    from desctune.files import stage_dir
    from tasks.evaluate import evaluate_adapter

    model = resolve_model(cfg, f"models:/{cfg.registry.model_name}/{champion.version}")
    out = stage_dir(cfg.artifacts_dir, "evaluate-champion", model["adapter_sha256"], test["sha256"], eval_cfg.digest())
    result = evaluate_adapter(model["adapter_path"], test["path"], eval_cfg, cfg.artifacts_dir, out)
    return result["metrics"]["finetuned"][cfg.registry.metric]


def register_model(cfg: Config, run_id: str, stages: dict) -> dict:
    """Log the adapter as an MLflow pyfunc model version, tag its lineage, set challenger and maybe champion."""
    from desctune.pyfunc import SIGNATURE, DescTuneModel
    import peft
    import torch
    import transformers

    c = client(cfg)
    name = cfg.registry.model_name
    trained, metrics, test = stages["train"], stages["evaluate"]["metrics"], stages["sample"]["test"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=DescTuneModel(),
            artifacts={"adapter": trained["adapter_path"]},
            signature=SIGNATURE,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
                f"peft=={peft.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
            registered_model_name=name,
            metadata={"base_model": stages["base"]["name"], "base_model_sha256": stages["base"]["sha256"]},
        )
    version = str(info.registered_model_version)
    key = cfg.registry.metric
    tags = {
        "desctune.run_id": run_id,
        "desctune.config_hash": cfg.digest(),
        "desctune.git_commit": git_commit(),
        "base_model": stages["base"]["name"],
        "base_model_sha256": stages["base"]["sha256"],
        "adapter_sha256": trained["adapter_sha256"],
        "data.input_sha256": stages["ingest"]["input_sha256"],
        "data.clean_sha256": stages["clean"]["sha256"],
        "data.train_sha256": stages["sample"]["train"]["sha256"],
        "data.test_sha256": test["sha256"],
        "eval_config": cfg.eval.digest(),
        **{f"metric.{m}_{k}": repr(float(metrics[m][k])) for m in ("base", "finetuned") for k in ("bleu", "rougeL")},
        **prefect_context(),
    }
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, str(v))
    c.update_model_version(
        name, version,
        description=(
            f"LoRA adapter on {stages['base']['name']}, trained by MLflow run {run_id}. "
            f"Test set ({metrics['n']} examples): BLEU {metrics['base']['bleu']:.2f} -> {metrics['finetuned']['bleu']:.2f}, "
            f"ROUGE-L {metrics['base']['rougeL']:.4f} -> {metrics['finetuned']['rougeL']:.4f} (base -> fine-tuned)."
        ),
    )
    champion = get_alias(c, name, CHAMPION)
    champion_value = champion_score(cfg, champion, test, cfg.eval)
    c.set_registered_model_alias(name, CHALLENGER, version)
    promoted = should_promote(metrics["finetuned"], metrics["base"], champion_value, key)
    if promoted:
        against = f"champion version {champion.version} ({champion_value:.4g})" if champion else "no champion"
        set_champion(c, name, version, "finetune flow",
                     f"metric gate: {key} {metrics['finetuned'][key]:.4g} beats base {metrics['base'][key]:.4g} and {against}")
    aliases = sorted(c.get_model_version(name, version).aliases)
    c.set_tag(run_id, "desctune.model_version", f"{name}/{version}")
    return {
        "name": name, "version": version, "aliases": aliases, "promoted": promoted,
        "previous_champion": str(champion.version) if champion else None, "champion_metric": champion_value,
        "model_uri": f"models:/{name}/{version}", "run_id": run_id, "run_url": run_url(cfg, run_id),
        "version_url": version_url(cfg, name, version),
        "tracking_uri": tracking_uri(cfg),
    }


@task(name="start-tracking", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=5)
def start_tracking(cfg: Config) -> str:
    """Open the MLflow run for this flow run; returns its id."""
    return start_run(cfg)


@task(name="register", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=10)
def register(cfg: Config, run_id: str, stages: dict) -> dict:
    """Log results and lineage, register the adapter, move aliases, close the MLflow run."""
    from prefect.artifacts import create_link_artifact

    log_results(cfg, run_id, stages)
    registered = register_model(cfg, run_id, stages)
    client(cfg).set_terminated(run_id, "FINISHED")
    create_link_artifact(registered["run_url"], link_text=f"MLflow run {run_id}", key="mlflow-run")
    create_link_artifact(registered["version_url"], link_text=f"{registered['name']} version {registered['version']}",
                         key="model-version")
    return registered


def fail_run(cfg: Config, flow_run_id: str) -> None:
    """Mark the MLflow run of a failed or crashed flow run as FAILED (used by the flow's state hooks)."""
    c = client(cfg)
    runs = c.search_runs([experiment_id(cfg)], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    for run in runs:
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "FAILED")


def log_evaluation(cfg: Config, model: dict, raw: dict, cleaned: dict, result: dict) -> dict:
    """An MLflow run of its own for one evaluation of a model version: metrics, datasets, report, version tags."""
    from tasks.evaluate import MODELS

    c = client(cfg)
    label = model["label"]
    tags = {"desctune.model_version": label, "desctune.model_ref": model["ref"], "desctune.kind": "evaluation",
            "desctune.data_path": raw["input_path"], "desctune.data_sha256": raw["input_sha256"], **prefect_context()}
    run_id = c.create_run(experiment_id(cfg), tags=tags, run_name=f"evaluate {label}").info.run_id
    try:
        metrics = result["metrics"]
        for m in MODELS:
            for k in ("bleu", "rougeL"):
                c.log_metric(run_id, f"{m}_{k}", metrics[m][k])
        for k in ("n", "better", "worse", "same", "identical_outputs"):
            c.log_metric(run_id, f"eval_{k}", float(metrics[k]))
        log_dataset(run_id, "eval-raw", raw["input_path"], raw["input_sha256"], "evaluation-raw", rows=raw["records"])
        log_dataset(run_id, "eval", cleaned["path"], cleaned["sha256"], "evaluation", rows=cleaned["kept"])
        for key in ("plot_path", "eval_path", "report_path", "metrics_path"):
            c.log_artifact(run_id, result[key], artifact_path="report")
        if model["version"]:
            c.set_model_version_tag(model["name"], model["version"], "last_evaluation_run", run_id)
    except Exception:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "run_url": run_url(cfg, run_id), "model": label, "metrics": result["metrics"]}


@task(name="resolve-model", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=5)
def resolve(cfg: Config, ref: str) -> dict:
    """The registered model version behind a models:/ URI (or an adapter directory), downloaded once."""
    return resolve_model(cfg, ref)


@task(name="log-evaluation", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=5)
def log_evaluation_run(cfg: Config, model: dict, raw: dict, cleaned: dict, result: dict) -> dict:
    """Record the evaluation in MLflow and link it from the Prefect flow run."""
    from prefect.artifacts import create_link_artifact

    logged = log_evaluation(cfg, model, raw, cleaned, result)
    create_link_artifact(logged["run_url"], link_text=f"MLflow evaluation run of {logged['model']}", key="mlflow-run")
    return logged
