"""The model registry's policy: the adapter as an MLflow model version with its lineage, the champion/challenger
gate, promotion and rollback with their history, and resolving a reference to a local adapter.

Every registered version gets the alias `challenger`; `champion` moves to it only when it beats the base and the
current champion on the configured metric, measured on the same test set.
"""

from __future__ import annotations

import getpass
import json
import os
from datetime import datetime, timezone

import mlflow

from desctune.config import Config
from desctune.errors import RegistryError
from desctune.lineage import git_commit
from desctune.tracking import client, run_url, tracking_uri, ui_base

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion_history"
MAX_HISTORY = 50


def version_url(cfg: Config, name: str, version: str) -> str:
    """The model version's page in the MLflow UI (the local `mlflow ui` for a SQLite store)."""
    return f"{ui_base(cfg)}/#/models/{name}/versions/{version}"


def metric_of(version, key: str) -> float | None:
    value = version.tags.get(f"metric.{key}")
    return float(value) if value is not None else None


def should_promote(challenger: dict, base: dict, champion: float | None, key: str) -> bool:
    """Strictly better than the base and than the current champion (ties keep the champion)."""
    if challenger[key] <= base[key]:
        return False
    return champion is None or challenger[key] > champion


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
    from desctune.evaluate import evaluate_adapter
    from desctune.stages import stage_folder

    model = resolve_model(cfg, f"models:/{cfg.registry.model_name}/{champion.version}")
    out = stage_folder(cfg.artifacts_dir, "evaluate-champion", model["adapter_sha256"], test["sha256"], eval_cfg)
    result = evaluate_adapter(model["adapter_path"], test["path"], eval_cfg, cfg.artifacts_dir, out)
    return result["metrics"]["finetuned"][cfg.registry.metric]


def register_model(cfg: Config, run_id: str, stages: dict, lineage: dict | None = None) -> dict:
    """Log the adapter as an MLflow pyfunc model version, tag its lineage (plus `lineage`, the orchestrator's run),
    set challenger and maybe champion. The run's whole config travels with the model as its model_config, so the
    registered model decodes with the run's evaluation settings."""
    import peft
    import torch
    import transformers

    from desctune.pyfunc import SIGNATURE, DescTuneModel

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
            model_config=json.loads(cfg.model_dump_json()),
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
        **(lineage or {}),
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
