"""The registry tasks: open the flow run's MLflow run, register the adapter (`desctune.registry.register`) with its lineage
(`desctune.registry.lineage`) and link both from the Prefect run; resolve and record evaluations of registered versions."""

from __future__ import annotations

import re

from prefect import task

from desctune.config import Config
from desctune.registry.lineage import log_evaluation, log_results, start_run
from desctune.registry.register import register_model, resolve_model
from desctune.results import CleanResult, EvaluateResult, IngestResult, RegisterResult, RunStages
from desctune.store import localize
from desctune.tracking import client, tracking_uri
from tasks.crashed import fail_crashed_runs
from tasks.stage import flow_run_tags, retry_unless_user_error, run_logger


def one_registration_at_a_time(model_name: str):
    """A Prefect concurrency limit of 1 per registered model (created on first use), held while a run decides and
    sets its version and aliases: two runs that finish together, on any workers, cannot both see the old champion
    and overwrite each other's alias, nor both add the same adapter.

    The limit is created through Prefect's tag-limit endpoint (a limit named `tag:<name>`, which no task's tags
    name), its only create-or-update: it reads and writes in one transaction, so on SQLite two runs creating it at
    once both succeed. The global-limit endpoint only inserts, and the loser of that race fails with a UNIQUE
    violation that the server logs as an ERROR with its traceback. On PostgreSQL both transactions can still read
    "none" and one insert fail (409): the limit then exists, which is all this needs."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import PrefectHTTPStatusError

    tag = "desctune-register-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_name)
    with get_client(sync_client=True) as prefect:
        try:
            prefect.create_concurrency_limit(tag=tag, concurrency_limit=1)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 409:
                raise
    return concurrency(f"tag:{tag}", occupy=1, strict=True)


@task(name="start-tracking", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=5)
def start_tracking(cfg: Config) -> str:
    """Open the MLflow run for this flow run; returns its id. First marks FAILED the runs of earlier flow runs that
    crashed (killed with SIGKILL, or their machine died), which nothing else would end."""
    fail_crashed_runs(tracking_uri(cfg), logger=run_logger())
    return start_run(cfg, flow_run_tags())


def register_serialized(cfg: Config, run_id: str, stages: RunStages, lineage: dict) -> dict:
    """Register under the model's lock: the champion is read, compared and replaced by one run at a time."""
    with one_registration_at_a_time(cfg.registry.model_name):
        return register_model(cfg, run_id, stages, lineage, logger=run_logger())


@task(name="register", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=10)
def register(cfg: Config, run_id: str, stages: RunStages) -> RegisterResult:
    """Log results and lineage, register the adapter, move aliases, close the MLflow run."""
    from prefect.artifacts import create_link_artifact

    stages = localize(cfg.artifacts_dir, stages)
    log_results(cfg, run_id, stages)
    registered = RegisterResult(**register_serialized(cfg, run_id, stages, flow_run_tags()))
    client(cfg).set_terminated(run_id, "FINISHED")
    name, version = registered.name, registered.version
    create_link_artifact(registered.run_url, link_text=f"MLflow run {run_id}", key="mlflow-run",
                         description="This flow run's MLflow run: its config as params, datasets with digests, "
                                     "training curves, evaluation scores and reports, and the logged model.")
    create_link_artifact(registered.version_url, link_text=f"{name} version {version}", key="model-version",
                         description=f"The model version this flow run registered ({decision_words(registered)}), "
                                     "with its description, lineage tags and aliases.")
    run_logger().info("registered %s version %s (%s)", name, version, decision_words(registered))
    return registered


def decision_words(registered: RegisterResult) -> str:
    """`@challenger because …`, `@champion because …` or `unchanged …`: the registry's decision in a few words."""
    why = registered.decision
    if registered.unchanged:
        return why
    alias = "@champion" if registered.promoted else "@challenger"
    return f"{alias} because {why.split(': ', 1)[-1]}"


@task(name="resolve-model", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=5)
def resolve(cfg: Config, ref: str) -> dict:
    """The registered model version behind a models:/ URI (or an adapter directory), downloaded once."""
    return resolve_model(cfg, ref)


@task(name="log-evaluation", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=5)
def log_evaluation_run(cfg: Config, model: dict, raw: IngestResult, cleaned: CleanResult, result: EvaluateResult
                       ) -> dict:
    """Record the evaluation in MLflow and link it from the Prefect flow run."""
    from prefect.artifacts import create_link_artifact

    raw, cleaned, result = localize(cfg.artifacts_dir, (raw, cleaned, result))
    logged = log_evaluation(cfg, model, raw, cleaned, result, flow_run_tags())
    create_link_artifact(logged["run_url"], link_text=f"MLflow evaluation run of {logged['model']}", key="mlflow-run",
                         description=f"The MLflow run of this evaluation of {logged['model']}: scores with their 95% "
                                     "intervals (BLEU and chrF++ 0-100, ROUGE-L 0-1), datasets and reports.")
    return logged
