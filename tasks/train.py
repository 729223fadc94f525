"""The train task: LoRA training (`desctune.training.loop`) cached on its data, base model and settings alone, streaming
its metrics into the flow run's MLflow run and its progress into the Prefect run's log."""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from desctune.config import Config, LoraConfig, ModelConfig, TrainConfig
from desctune.results import BaseModelResult, TokenizeResult, TrainResult
from desctune.stagelock import exclusive
from desctune.stages import code_version, stage_folder
from desctune.store import localize, publish
from desctune.tracking import mlflow_sink
from desctune.training.launch import train_under_torchrun
from desctune.training.loop import train_adapter
from tasks.stage import retry_unless_user_error, run_logger, stage_cache

CODE = code_version("train")


@task(
    name="train",
    cache_policy=stage_cache((INPUTS - "run_id" - "tracking_uri") + TASK_SOURCE),
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_condition_fn=retry_unless_user_error,
)
def train(
    tokens: TokenizeResult,
    base: BaseModelResult,
    model: ModelConfig,
    lora: LoraConfig,
    training: TrainConfig,
    artifacts_dir: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    code: str = CODE,
) -> TrainResult:
    """Train (or resume) the adapter for this exact data and configuration; cached on those alone.

    Prefect retries it once: the retry resumes from the newest checkpoint the failed attempt left (also when one of
    several torchrun processes died). Two identical runs at once train once: the second waits on the stage folder's
    lock and reuses the first one's result."""
    cfg = Config(artifacts_dir=artifacts_dir, model=model, lora=lora, train=training)
    out_dir = stage_folder(artifacts_dir, "train", tokens.train.sha256, tokens.val.sha256, base.sha256, model, lora,
                           training)
    log_params, log_metrics = mlflow_sink(run_id, tracking_uri)

    progress_seconds = float(os.environ.get("DESCTUNE_PROGRESS_SECONDS", "20"))

    def run() -> dict:
        local_tokens, local_base = (r.core() for r in localize(artifacts_dir, (tokens, base)))
        if training.distributed:  # train.nproc_per_node x nnodes processes under torchrun; rank 0 logs to MLflow
            result = train_under_torchrun(local_tokens, local_base, cfg, out_dir, run_logger(), run_id,
                                          tracking_uri, progress_seconds)
        else:
            result = train_adapter(local_tokens, local_base, cfg, out_dir, run_logger(), log_params,
                                   log_metrics, progress_seconds=progress_seconds)
        return result | {"mlflow_run_id": run_id}

    return publish(artifacts_dir, out_dir, TrainResult.from_core(exclusive(out_dir, run)))
