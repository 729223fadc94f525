"""The evaluate-champion flow: re-evaluate the registry's champion (and its base) on a dataset, for scheduled checks.

ingest -> clean (the finetune flow's own tasks) -> resolve the model -> evaluate -> an MLflow run tagged with the
version. It only composes.
"""

from __future__ import annotations

from prefect import flow

from desctune.config import Config
from tasks.clean import clean
from tasks.evaluate import evaluate_model
from tasks.ingest import fingerprint, ingest
from tasks.register import log_evaluation_run, resolve
from tasks.watchdog import exit_with_worker


@flow(name="evaluate-champion", log_prints=True)
def evaluate_champion(
    config: Config = Config(), dataset: str = "data/amazon_titles_eval.jsonl", alias: str = "champion"
) -> dict:
    """Evaluate models:/{registry.model_name}@{alias} against its base on `dataset` (default: the held-out eval set)."""
    exit_with_worker()
    data = config.data.for_scoring(dataset)
    raw = ingest(data, config.artifacts_dir, fingerprint(dataset))
    cleaned = clean(raw, data, config.artifacts_dir)
    model = resolve(config, f"models:/{config.registry.model_name}@{alias}")
    evaluated = evaluate_model(model, cleaned, config.eval, config.artifacts_dir)
    logged = log_evaluation_run(config, model, raw, cleaned, evaluated)
    return {"model": model, "evaluate": evaluated, "mlflow": logged}
