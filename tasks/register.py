"""Register: the MLflow run that records a flow run, and the adapter as a model version with lineage.

Every registered version gets the alias `challenger`; `champion` moves to it only when it beats the base and the
current champion on the configured metric, measured on the same test set.
"""

from __future__ import annotations

import json
import logging
import subprocess
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from prefect import task

from desctune.config import Config, config_to_yaml
from desctune.tracking import client, experiment_id, run_url, tracking_uri

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"


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

    if not flow_run.id:
        return {}
    return {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name or "",
            "prefect.flow_run_url": flow_run.ui_url or ""}


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


def log_dataset(run_id: str, name: str, path: str, digest: str, context: str, frame: pd.DataFrame | None = None) -> None:
    """mlflow.log_input with the file as source and its content hash as digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    if frame is not None:
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:16])
    else:
        dataset = MetaDataset(source=source, name=name, digest=digest[:16])
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
    log_dataset(run_id, "raw", ing["input_path"], ing["input_sha256"], "raw")
    log_dataset(run_id, "clean", cln["path"], cln["sha256"], "clean")
    for split in ("train", "test"):
        frame = pd.read_parquet(spl[split]["path"])
        log_dataset(run_id, split, spl[split]["path"], spl[split]["sha256"], split, frame)
    for path in (trained.get("loss_plot"), evaluated["plot_path"], evaluated["eval_path"], cln.get("rejects_path")):
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


def champion_score(cfg: Config, champion, test: dict, eval_cfg) -> float | None:
    """The champion's metric on this run's test set: from its tags when it was measured there, else re-measured."""
    if champion is None:
        return None
    if champion.tags.get("data.test_sha256") == test["sha256"] and champion.tags.get("eval_config") == eval_cfg.digest():
        return metric_of(champion, f"finetuned_{cfg.registry.metric}")
    from tasks.evaluate import evaluate_adapter
    from desctune.files import stage_dir

    adapter = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.registry.model_name}/{champion.version}")) / "artifacts" / "adapter"
    out = stage_dir(cfg.artifacts_dir, "evaluate-champion", champion.version, test["sha256"], eval_cfg.digest())
    result = evaluate_adapter(str(adapter), test["path"], eval_cfg, cfg.artifacts_dir, out)
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
        **{f"metric.{m}_{k}": f"{metrics[m][k]:.6g}" for m in ("base", "finetuned") for k in ("bleu", "rougeL")},
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
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        champion = None
    champion_value = champion_score(cfg, champion, test, cfg.eval)
    c.set_registered_model_alias(name, CHALLENGER, version)
    promoted = should_promote(metrics["finetuned"], metrics["base"], champion_value, key)
    if promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
        c.set_model_version_tag(name, version, "promoted_by", "finetune flow (metric gate)")
    aliases = sorted(c.get_model_version(name, version).aliases)
    c.set_tag(run_id, "desctune.model_version", f"{name}/{version}")
    return {
        "name": name, "version": version, "aliases": aliases, "promoted": promoted,
        "previous_champion": champion.version if champion else None, "champion_metric": champion_value,
        "model_uri": f"models:/{name}/{version}", "run_id": run_id, "run_url": run_url(cfg, run_id),
        "tracking_uri": tracking_uri(cfg),
    }


@task(name="start-tracking", retries=2, retry_delay_seconds=5)
def start_tracking(cfg: Config) -> str:
    """Open the MLflow run for this flow run; returns its id."""
    return start_run(cfg)


@task(name="register", retries=2, retry_delay_seconds=10)
def register(cfg: Config, run_id: str, stages: dict) -> dict:
    """Log results and lineage, register the adapter, move aliases, close the MLflow run."""
    from prefect.artifacts import create_link_artifact

    log_results(cfg, run_id, stages)
    registered = register_model(cfg, run_id, stages)
    client(cfg).set_terminated(run_id, "FINISHED")
    create_link_artifact(registered["run_url"], link_text=f"MLflow run {run_id}", key="mlflow-run")
    return registered


def fail_run(cfg: Config, flow_run_id: str) -> None:
    """Mark the MLflow run of a failed or crashed flow run as FAILED (used by the flow's state hooks)."""
    c = client(cfg)
    runs = c.search_runs([experiment_id(cfg)], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    for run in runs:
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "FAILED")
