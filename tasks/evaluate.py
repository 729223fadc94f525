"""The evaluate tasks: base vs fine-tuned on the test split (or a registered version on any cleaned data), scored by
`desctune.evaluate`, published as Prefect artifacts; the guard refuses an adapter with no effect."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from desctune.config import EvalConfig
from desctune.evaluate import evaluate_adapter, guard_adapter
from desctune.stages import stage_folder


def publish(result: dict, key: str = "evaluation") -> None:
    """The report as Prefect artifacts: markdown (scores, summary, worst examples) and the per-example table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    df = pd.read_parquet(result["eval_path"])
    create_markdown_artifact(Path(result["report_path"]).read_text(), key=key, description="base vs fine-tuned")
    columns = ["title", "base_rougeL", "finetuned_rougeL", "delta_rougeL", "base_bleu", "finetuned_bleu", "delta_bleu"]
    create_table_artifact(df[columns].round(4).to_dict(orient="records"), key=f"{key}-examples",
                          description="per-example scores (the full table with outputs is eval.parquet)")


@task(name="evaluate", retries=0)
def evaluate(trained: dict, splits: dict, cfg: EvalConfig, artifacts_dir: str) -> dict:
    """Evaluate the trained adapter on the test split, publish the report, then refuse an adapter with no effect."""
    out_dir = stage_folder(artifacts_dir, "evaluate", trained["adapter_sha256"], splits["test"]["sha256"], cfg)
    result = evaluate_adapter(trained["adapter_path"], splits["test"]["path"], cfg, artifacts_dir, out_dir, True)
    publish(result)
    guard_adapter(result["adapter_status"], result["metrics"]["identical_outputs"])
    return result


@task(name="evaluate-model", retries=0)
def evaluate_model(model: dict, cleaned: dict, cfg: EvalConfig, artifacts_dir: str) -> dict:
    """Evaluate a registered model version (and its base) on a cleaned dataset and publish the report."""
    out_dir = stage_folder(artifacts_dir, "evaluate-model", model["adapter_sha256"], cleaned["sha256"], cfg)
    result = evaluate_adapter(model["adapter_path"], cleaned["path"], cfg, artifacts_dir, out_dir)
    publish(result, key="champion-evaluation")
    return result
