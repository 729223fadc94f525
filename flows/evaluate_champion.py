"""The evaluate-champion flow: re-evaluate the registry's champion (and its base) on a dataset, for scheduled checks.

ingest -> clean (the finetune flow's own tasks) -> resolve the model -> evaluate -> an MLflow run tagged with the
version. It only composes.
"""

from __future__ import annotations

from prefect import flow

from desctune.config import Config, EvalConfig, GenerationConfig, RegistryConfig
from tasks.clean import clean
from tasks.evaluate import evaluate_model
from tasks.ingest import fingerprint, ingest
from tasks.register import log_evaluation_run, resolve
from tasks.watchdog import exit_with_worker


def scoring_config(model_name: str, generation: GenerationConfig | dict, artifacts_dir: str, experiment: str) -> Config:
    """The Config the flow scores with, made from its parameters (deployments/schedules.py checks a deployment of it
    with the same)."""
    eval_config = EvalConfig(**GenerationConfig.model_validate(generation).model_dump())
    return Config(artifacts_dir=artifacts_dir, eval=eval_config,
                  registry=RegistryConfig(model_name=model_name, experiment=experiment))


@flow(name="evaluate-champion", log_prints=True)
def evaluate_champion(
    dataset: str,
    alias: str,
    model_name: str = RegistryConfig().model_name,
    generation: GenerationConfig = GenerationConfig(),
    artifacts_dir: str = Config().artifacts_dir,
    experiment: str = RegistryConfig().experiment,
) -> dict:
    """Evaluate models:/{model_name}@{alias} against its base model on `dataset` and log the scores to MLflow.

    Args:
        dataset: the file to score on (a .jsonl, .json or .gz of titles and descriptions, read and cleaned like the
            training data, review blurbs kept); the scheduled check uses the held-out data/amazon_titles_eval.jsonl.
        alias: the registered version to evaluate, by its alias: champion, challenger or one of your own.
        model_name: the registered model the alias belongs to.
        generation: how both models generate: on the first `limit` usable records, `batch_size` at a time.
        artifacts_dir: where the stage outputs, the downloaded version and the report go.
        experiment: the MLflow experiment the evaluation run is logged to.
    """
    exit_with_worker()
    config = scoring_config(model_name, generation, artifacts_dir, experiment)
    data = config.data.for_scoring(dataset)
    raw = ingest(data, config.artifacts_dir, fingerprint(dataset))
    cleaned = clean(raw, data, config.artifacts_dir)
    model = resolve(config, f"models:/{model_name}@{alias}")
    evaluated = evaluate_model(model, cleaned, config.eval, config.artifacts_dir)
    logged = log_evaluation_run(config, model, raw, cleaned, evaluated)
    return {"model": model, "evaluate": evaluated, "mlflow": logged}
