"""The model registry's policy: the adapter as an MLflow model version with its lineage, the champion/challenger
gate, promotion and rollback with their history, and resolving a reference to a local adapter.

Every registered version gets the alias `challenger`; `champion` moves to it only when it beats the base and the
current champion on the configured metric, measured on the same test set, by more than chance (a paired 95% interval).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd

from desctune.config import Config
from desctune.errors import RegistryError
from desctune.registry.lineage import flow_run_link, git_commit
from desctune.registry.links import md_link
from desctune.results import RunStages, Split
from desctune.tracking import TRAINING_VIEW, client, hide_password, run_url, tracking_uri, ui_base

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion_history"
MAX_HISTORY = 50
EVAL_ARTIFACT = "evaluation/eval.parquet"  # each version's per-example evaluation, in its run


def version_url(cfg: Config, name: str, version: str) -> str:
    """The model version's page in the MLflow UI (the local `mlflow ui` for a SQLite store)."""
    return f"{ui_base(cfg)}/#/models/{name}/versions/{version}?{TRAINING_VIEW}"


def gate(challenger: dict, base: dict, champion: float | None, key: str, interval: dict | None = None,
         min_improvement: float = 0.0, champion_label: str = "the champion",
         base_interval: dict | None = None, claims: dict | None = None,
         max_claim_increase: float = 0.0) -> tuple[bool, str]:
    """Whether a challenger becomes champion, and why, in one sentence: strictly better than the base and than the
    champion on `key` (ties keep the champion), and significantly so: given the paired 95% interval of (challenger -
    base), `base_interval`, or of (challenger - champion), `interval`, on the same test records, its lower bound must
    lie above `min_improvement`. The first champion is held to the same bar against the base.

    Before any of that, the claims rule: `claims` is the paired interval of the share of outputs with an invented
    claim, challenger - champion (or - base for a first version; `against` names which, `rate` and `against_rate` are
    the two shares); when its lower bound lies above `max_claim_increase`, the challenger stays challenger whatever
    its score."""
    if claims is not None and claims["low"] > max_claim_increase:
        return False, (f"stays challenger by the claims rule: invented claims {claims['rate']:.0%} against "
                       f"{claims['against']}'s {claims['against_rate']:.0%}, {_pts(claims)}, significantly more than "
                       f"registry.max_claim_increase {max_claim_increase:g} allows")
    promoted, why = _score_gate(challenger, base, champion, key, interval, min_improvement, champion_label,
                                base_interval)
    if claims is not None:
        why += (f"; invented claims {claims['rate']:.0%} against {claims['against']}'s {claims['against_rate']:.0%}, "
                f"{_pts(claims)}, not significantly more")
    return promoted, why


def _pts(interval: dict) -> str:
    """'+4 pts [-3, +12], 95% CI': a difference of shares in percentage points."""
    return (f"{interval['delta'] * 100:+.0f} pts [{interval['low'] * 100:+.0f}, {interval['high'] * 100:+.0f}], "
            "95% CI")


def _score_gate(challenger: dict, base: dict, champion: float | None, key: str, interval: dict | None,
                min_improvement: float, champion_label: str, base_interval: dict | None) -> tuple[bool, str]:
    """The score rules of `gate`."""
    value, over_base = challenger[key], f"{key} {challenger[key]:.4g} beats base {base[key]:.4g}"
    if value <= base[key]:
        return False, f"stays challenger: {key} {value:.4g} does not beat base {base[key]:.4g}"
    if base_interval is not None and base_interval["low"] <= min_improvement:
        return False, (f"stays challenger: {over_base} {_ci(base_interval)}, but not significantly: the interval does "
                       f"not lie above registry.min_improvement {min_improvement:g}")
    if champion is None:
        by = f" {_ci(base_interval)}," if base_interval is not None else ""
        return True, f"champion: {over_base}{by} and there was no champion"
    if value <= champion:
        return False, f"stays challenger: {key} {value:.4g} does not beat {champion_label} ({champion:.4g})"
    if interval is None:
        return True, f"champion: {over_base} and {champion_label} ({champion:.4g})"
    if interval["low"] <= min_improvement:
        return False, (f"stays challenger: {over_base} and {champion_label} ({champion:.4g}) {_ci(interval)}, but not "
                       f"significantly: the interval does not lie above registry.min_improvement {min_improvement:g}")
    return True, f"champion: {over_base} and {champion_label} ({champion:.4g}) {_ci(interval)}"


def _ci(interval: dict) -> str:
    """'by +0.05 [+0.02, +0.08], 95% CI': a paired difference and its interval."""
    return f"by {interval['delta']:+.4g} [{interval['low']:+.4g}, {interval['high']:+.4g}], 95% CI"


def should_promote(challenger: dict, base: dict, champion: float | None, key: str, interval: dict | None = None,
                   min_improvement: float = 0.0, base_interval: dict | None = None, claims: dict | None = None,
                   max_claim_increase: float = 0.0) -> bool:
    """The gate's decision without its sentence."""
    return gate(challenger, base, champion, key, interval, min_improvement, base_interval=base_interval,
                claims=claims, max_claim_increase=max_claim_increase)[0]


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
    from desctune.registry.modelref import resolve as resolve_ref

    found = resolve_ref(ref, tracking_uri(cfg), cfg.artifacts_dir)
    return {"ref": ref, "name": found.name, "version": found.version, "run_id": found.run_id, "label": found.label,
            "adapter_path": str(found.adapter_dir), "adapter_sha256": dir_sha256(found.adapter_dir)}


def champion_examples(cfg: Config, champion, test: Split, eval_cfg, logger=log) -> pd.DataFrame:
    """The champion's per-example evaluation on this run's test set: the table it was registered with when it was
    measured there with the same settings, else a fresh evaluation of it."""
    tags = champion.tags
    if tags.get("data.test_sha256") == test.sha256 and tags.get("eval_config") == eval_cfg.digest():
        try:
            path = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path=EVAL_ARTIFACT,
                                                       tracking_uri=tracking_uri(cfg))
            return pd.read_parquet(path)
        except mlflow.exceptions.MlflowException:
            pass
    from desctune.evaluation.evaluate import evaluate_adapter
    from desctune.stages import stage_folder

    model = resolve_model(cfg, f"models:/{cfg.registry.model_name}/{champion.version}")
    out = stage_folder(cfg.artifacts_dir, "evaluate-champion", model["adapter_sha256"], test.sha256, eval_cfg)
    logger.info("register: evaluating champion version %s on this run's test records for the gate (it was measured "
                "on other records or with other settings)", champion.version)
    result = evaluate_adapter(model["adapter_path"], test.path, eval_cfg, cfg.artifacts_dir, out, logger=logger)
    return pd.read_parquet(result["eval_path"])


def versus_champion(key: str, challenger: pd.DataFrame, champion: pd.DataFrame) -> tuple[float, dict]:
    """The champion's `key` on the same records and the paired 95% interval of (challenger - champion)."""
    from desctune.evaluation import significance as sig

    if challenger["reference"].tolist() != champion["reference"].tolist():
        raise RegistryError("the champion's evaluation is not on the challenger's test records: cannot compare them")
    if key == "rougeL":
        return float(champion["finetuned_rougeL"].mean()), sig.paired_mean(champion["finetuned_rougeL"].tolist(),
                                                                            challenger["finetuned_rougeL"].tolist())
    refs = challenger["reference"].tolist()
    a = sig.corpus_stats(key, champion["finetuned_output"].tolist(), refs)
    b = sig.corpus_stats(key, challenger["finetuned_output"].tolist(), refs)
    return sig.corpus_score(key, a.sum(axis=0)), sig.paired_corpus(key, a, b)


def claims_versus_champion(challenger: pd.DataFrame, champion: pd.DataFrame, label: str) -> dict | None:
    """The paired interval of (challenger - champion) in share of outputs with an invented claim, on the same
    records, for the gate's claims rule; None for a table without titles (older evaluations)."""
    from desctune.evaluation import claims as cl
    from desctune.evaluation import significance as sig

    if "title" not in challenger or "title" not in champion:
        return None
    has = [[float(bool(c)) for c in cl.claim_flags(t["finetuned_output"].tolist(), t["title"].tolist())]
           for t in (champion, challenger)]
    return {**sig.paired_mean(*has), "rate": sum(has[1]) / max(len(has[1]), 1),
            "against": label, "against_rate": sum(has[0]) / max(len(has[0]), 1)}


def claims_versus_base(metrics: dict) -> dict | None:
    """The evaluation's paired interval of (fine-tuned - base) in share of outputs with an invented claim."""
    if "claims" not in metrics:
        return None
    rates = metrics["claims"]["rates"]
    return {**metrics["claims"]["comparison"]["any"], "rate": rates["finetuned"]["any"], "against": "the base",
            "against_rate": rates["base"]["any"]}


def scored_tags(stages: RunStages) -> dict:
    """The file the version was scored on instead of the test split, and its sha256 (`data.test_sha256` is that of
    its cleaned records)."""
    if stages.scored is None:
        return {}
    ing = stages.scored.ingest
    return {"data.test_input": ing.input_path, "data.test_input_sha256": ing.input_sha256}


def scored_set(stages: RunStages) -> str:
    """What the run was scored on, in words."""
    n = stages.evaluate.metrics["n"]
    if stages.scored is None:
        return f"Test set ({n} examples)"
    return f"Held-out file {stages.scored.ingest.input_path} ({n} examples)"


def claim_tags(metrics: dict) -> dict:
    """The invented-claims rates (share of outputs, 0-1) of base, fine-tuned and references, and the paired interval
    of fine-tuned - base, as version tags."""
    if "claims" not in metrics:
        return {}
    rates = metrics["claims"]["rates"]
    return {**{f"metric.claims_{who}": repr(float(r["any"])) for who, r in rates.items()},
            "metric.delta_claims": json.dumps(metrics["claims"]["comparison"]["any"])}


def metric_tags(metrics: dict) -> dict:
    """An evaluation's figures as the version tags model-version search, the model card and the demo read: the
    examples scored (`metric.n`), each model's BLEU, ROUGE-L and chrF++, each difference with its paired interval
    (JSON) and the invented-claims rates."""
    return {
        "metric.n": str(metrics["n"]),
        **{f"metric.{m}_{k}": repr(float(metrics[m][k])) for m in ("base", "finetuned")
           for k in ("bleu", "rougeL", "chrf") if k in metrics[m]},
        **{f"metric.delta_{k}": json.dumps(v) for k, v in metrics.get("comparison", {}).items()},
        **claim_tags(metrics),
    }


def made_by(run_id: str, run_link: str | None = None, lineage: dict | None = None) -> str:
    """Which MLflow run trained a version and which flow run made it, as Markdown links where their URLs are known
    ("trained by [MLflow run ID](URL) in [Prefect flow run NAME](URL)")."""
    run = md_link(f"MLflow run {run_id}", run_link) if run_link else f"MLflow run {run_id}"
    flow_run = flow_run_link(lineage)
    return f"trained by {run}" + (f" in {flow_run}" if flow_run else "")


def description(stages: RunStages, run_id: str, run_link: str | None = None, lineage: dict | None = None) -> str:
    """The model version's description, for people (MLflow renders it as Markdown): what it is, links to the run
    and flow run that made it, and whether it beat its base and how surely."""
    from desctune.evaluation.evaluate import significance_lines

    m = stages.evaluate.metrics
    b, f = m["base"], m["finetuned"]
    return (f"LoRA adapter on {stages.base.name} that writes a product description from a product title, "
            f"{made_by(run_id, run_link, lineage)}. {scored_set(stages)}, base -> fine-tuned: "
            f"BLEU {b['bleu']:.2f} -> {f['bleu']:.2f} (0-100), ROUGE-L {b['rougeL']:.4f} -> {f['rougeL']:.4f} (0-1), "
            f"chrF++ {b['chrf']:.2f} -> {f['chrf']:.2f} (0-100). " + "; ".join(significance_lines(m))
            + f"; better on {m['better']}, worse on {m['worse']} examples (by ROUGE-L).")


def model_description(stages: RunStages) -> str:
    """The registered model's description: what its versions do and how to use them."""
    return (f"LoRA adapters on {stages.base.name} that write an e-commerce product description from a product "
            "title, fine-tuned and evaluated by desctune's finetune flow. Each version is a pyfunc model: input a "
            "`title` column, output the description. @champion is the version in use (it beat the base and the "
            "previous champion on the registry metric, significantly); @challenger is the newest. Scores in each "
            "version's description: BLEU and chrF++ 0-100, ROUGE-L 0-1.")


def same_model(c, name: str, adapter_sha256: str, test_sha256: str, eval_config: str):
    """The version that already holds this adapter, evaluated on the same test records with the same settings."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name = '{name}' and tags.adapter_sha256 = '{adapter_sha256}'")
    except MlflowException:
        return None
    found = [v for v in found if v.tags.get("data.test_sha256") == test_sha256
             and v.tags.get("eval_config") == eval_config]
    return min(found, key=lambda v: int(v.version)) if found else None


def unchanged(cfg: Config, c, version, run_id: str) -> dict:
    """What register reports when an unchanged run names the version it would have duplicated."""
    name, number = version.name, str(version.version)
    c.set_tag(run_id, "desctune.model_version", f"{name}/{number}")
    champion = get_alias(c, name, CHAMPION)
    return {
        "name": name, "version": number, "aliases": sorted(c.get_model_version(name, number).aliases),
        "promoted": False, "unchanged": True,
        "decision": f"unchanged: version {number} already holds this adapter, evaluated on the same test records with "
                    "the same settings; no new version, aliases as they were",
        "previous_champion": str(champion.version) if champion else None, "champion_metric": None,
        "model_uri": f"models:/{name}/{number}", "run_id": run_id, "run_url": run_url(cfg, run_id),
        "version_url": version_url(cfg, name, number), "tracking_uri": hide_password(tracking_uri(cfg)),
    }


def register_model(cfg: Config, run_id: str, stages: RunStages, lineage: dict | None = None, logger=log) -> dict:
    """Log the adapter as an MLflow pyfunc model version, tag its lineage (plus `lineage`, the orchestrator's run),
    set challenger and maybe champion. The run's whole config travels with the model as its model_config, so the
    registered model decodes with the run's evaluation settings."""
    from desctune.registry.pyfunc import MODEL_CODE, PACKAGE_DIR, SIGNATURE, requirements

    c = client(cfg)
    name = cfg.registry.model_name
    trained, metrics, test = stages.train, stages.evaluate.metrics, stages.test()
    same = same_model(c, name, trained.adapter.sha256, test.sha256, cfg.eval.digest())
    if same is not None and same.run_id != run_id:
        return unchanged(cfg, c, same, run_id)
    retried = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if retried:
        version = str(retried[0].version)
    else:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                code_paths=[str(PACKAGE_DIR)],
                artifacts={"adapter": trained.adapter.path},
                signature=SIGNATURE,
                pip_requirements=requirements(stages.base.name),
                registered_model_name=name,
                metadata={"base_model": stages.base.name, "base_model_sha256": stages.base.sha256},
                model_config=json.loads(cfg.model_dump_json()),
            )
        version = str(info.registered_model_version)
    key = cfg.registry.metric
    tags = {
        "desctune.run_id": run_id,
        "desctune.config_hash": cfg.digest(),
        "desctune.git_commit": git_commit(),
        "base_model": stages.base.name,
        "base_model_sha256": stages.base.sha256,
        "adapter_sha256": trained.adapter.sha256,
        "data.input_sha256": stages.ingest.input_sha256,
        "data.clean_sha256": stages.clean.clean.sha256,
        "data.train_sha256": stages.sample.train.sha256,
        "data.test_sha256": test.sha256,
        **scored_tags(stages),
        "eval_config": cfg.eval.digest(),
        **metric_tags(metrics),
        **(lineage or {}),
    }
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, str(v))
    evaluation = pd.read_parquet(stages.evaluate.table.path)
    folder, filename = EVAL_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(stages.evaluate.table.path, Path(tmp) / filename)
        c.log_artifact(run_id, str(Path(tmp) / filename), artifact_path=folder)
    c.update_model_version(name, version, description=description(stages, run_id, run_url(cfg, run_id), lineage))
    if not c.get_registered_model(name).description:
        c.update_registered_model(name, description=model_description(stages))
    champion = get_alias(c, name, CHAMPION)
    champion_value, interval, claims = None, None, claims_versus_base(metrics)
    if champion is not None:
        champion_table = champion_examples(cfg, champion, test, cfg.eval, logger)
        champion_value, interval = versus_champion(key, evaluation, champion_table)
        claims = claims_versus_champion(evaluation, champion_table, f"champion version {champion.version}")
    c.set_registered_model_alias(name, CHALLENGER, version)
    promoted, why = gate(metrics["finetuned"], metrics["base"], champion_value, key, interval,
                         cfg.registry.min_improvement, f"champion version {champion.version}" if champion else "",
                         metrics["comparison"][key], claims, cfg.registry.max_claim_increase)
    c.set_model_version_tag(name, version, "champion_gate", why)
    if promoted:
        set_champion(c, name, version, "finetune flow", f"metric gate: {why}")
    aliases = sorted(c.get_model_version(name, version).aliases)
    c.set_tag(run_id, "desctune.model_version", f"{name}/{version}")
    note = c.get_run(run_id).data.tags.get("mlflow.note.content", "")
    registered_as = md_link(f"{name} version {version}", version_url(cfg, name, version))
    c.set_tag(run_id, "mlflow.note.content", f"{note}\n\nRegistered as {registered_as} "
                                             f"(@{', @'.join(aliases)}): {why}.".strip())
    return {
        "name": name, "version": version, "aliases": aliases, "promoted": promoted, "unchanged": False,
        "decision": why,
        "previous_champion": str(champion.version) if champion else None, "champion_metric": champion_value,
        "model_uri": f"models:/{name}/{version}", "run_id": run_id, "run_url": run_url(cfg, run_id),
        "version_url": version_url(cfg, name, version),
        "tracking_uri": hide_password(tracking_uri(cfg)),
    }
