"""The evaluate tasks: base vs fine-tuned on the run's scored records (or a registered version on any cleaned data),
scored by `desctune.evaluation.evaluate`, published as Prefect artifacts; the guard refuses an adapter with no
effect."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from desctune import store
from desctune.config import EvalConfig
from desctune.errors import AdapterError
from desctune.evaluation.evaluate import evaluate_adapter, guard_adapter
from desctune.results import CleanResult, EvaluateResult, Split, TrainResult
from desctune.stages import stage_folder
from tasks.stage import run_logger, stage_cache


def publish(result: EvaluateResult, key: str = "evaluation") -> None:
    """The report as Prefect artifacts: markdown (scores, summary, worst examples) and the per-example table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    df = pd.read_parquet(result.table.path)
    create_markdown_artifact(Path(result.report.path).read_text(), key=key, description="base vs fine-tuned")
    columns = ["title", "base_rougeL", "finetuned_rougeL", "delta_rougeL", "base_bleu", "finetuned_bleu", "delta_bleu"]
    create_table_artifact(df[columns].round(4).to_dict(orient="records"), key=f"{key}-examples",
                          description="per-example scores (the full table with outputs is eval.parquet)")


def evaluate_key(context, parameters: dict) -> str:
    """The evaluation's own inputs: the adapter's and the scored records' content, the settings and the code version
    (not the rest of the train result, which carries the MLflow run that trained it)."""
    out_dir = stage_folder(parameters["artifacts_dir"], "evaluate", parameters["trained"].adapter.sha256,
                           parameters["test"].sha256, parameters["cfg"])
    where = store.canonical(parameters["artifacts_dir"], out_dir)  # the same on every worker of a shared store
    return f"{out_dir.name}-{hash_objects(where, context.task.fn.__code__.co_code)}"


@task(name="evaluate", cache_policy=stage_cache(CachePolicy.from_cache_key_fn(evaluate_key)), persist_result=True,
      result_serializer="json", retries=0)
def evaluate(trained: TrainResult, test: Split, cfg: EvalConfig, artifacts_dir: str) -> EvaluateResult:
    """Evaluate the trained adapter on `test` (the run's scored records: its test split or the cleaned
    `eval.test_path` file) and refuse one with no effect (publishing the report first, so a refused run shows why).
    Cached on the adapter's and the records' content and the evaluation settings."""
    out_dir = stage_folder(artifacts_dir, "evaluate", trained.adapter.sha256, test.sha256, cfg)
    trained, test = store.localize(artifacts_dir, (trained, test))
    result = EvaluateResult.from_core(evaluate_adapter(trained.adapter.path, test.path, cfg, artifacts_dir,
                                                       out_dir, True, logger=run_logger()))
    try:
        guard_adapter(result.adapter_status, result.metrics["identical_outputs"])
    except AdapterError:
        publish(result)
        raise
    return store.publish(artifacts_dir, out_dir, result)


@task(name="report")
def report(evaluated: EvaluateResult, artifacts_dir: str = "artifacts") -> None:
    """The evaluation's report in this flow run's artifacts, computed now or taken from the cache."""
    publish(store.localize(artifacts_dir, evaluated))


@task(name="evaluate-model", retries=0)
def evaluate_model(model: dict, cleaned: CleanResult, cfg: EvalConfig, artifacts_dir: str) -> EvaluateResult:
    """Evaluate a registered model version (and its base) on a cleaned dataset and publish the report."""
    out_dir = stage_folder(artifacts_dir, "evaluate-model", model["adapter_sha256"], cleaned.clean.sha256, cfg)
    cleaned = store.localize(artifacts_dir, cleaned)
    result = EvaluateResult.from_core(evaluate_adapter(model["adapter_path"], cleaned.clean.path, cfg, artifacts_dir,
                                                       out_dir, logger=run_logger()))
    publish(result, key="champion-evaluation")
    return result
