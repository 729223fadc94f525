"""What every stage task shares besides its folder (`desctune.stages`): the cache policy, when to retry, where its
log lines and counts go.

Prefect's default policy includes the flow run id, so nothing would be reused between runs. Stages use
INPUTS + TASK_SOURCE with persisted results; TASK_SOURCE hashes only the task function's own text, so each stage
also takes `code=code_version(stage)` as a default argument.
"""

from __future__ import annotations

import logging

from prefect.cache_policies import INPUTS, TASK_SOURCE

from desctune.errors import UserError

STAGE_CACHE = INPUTS + TASK_SOURCE


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never a mistake the user must fix first."""
    return not isinstance(state.result(raise_on_failure=False), UserError)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger (shown in the UI) inside a flow or task run, the stage module's logger elsewhere."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("desctune")


def report_counts(title: str, rows: list[dict], key: str) -> None:
    """A Prefect table artifact with a stage's counts, when running inside a flow or task run."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        create_table_artifact(key=key, table=rows, description=title)


LOCAL_PREFECT_UI = "http://127.0.0.1:4200"


def prefect_ui_url() -> str:
    """The UI of the Prefect server this process reports to: PREFECT_UI_URL (derived by Prefect from PREFECT_API_URL),
    else the API URL of the run's own client, else (an ephemeral server, which has no UI) the default local one."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_UI_URL

    if PREFECT_UI_URL.value():
        return PREFECT_UI_URL.value().rstrip("/")
    ctx = TaskRunContext.get() or FlowRunContext.get()
    api = str(getattr(getattr(ctx, "client", None), "api_url", "") or "").rstrip("/")
    if api.startswith("http") and "ephemeral" not in api:
        return api.removesuffix("/api")
    return LOCAL_PREFECT_UI


def flow_run_tags() -> dict:
    """The current Prefect flow run's id, name and UI link, as MLflow lineage tags (empty outside a flow run)."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    ui = prefect_ui_url()
    return {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name or "",
            "prefect.flow_run_url": f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}"}
