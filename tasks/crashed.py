"""Runs that crashed: mark the MLflow run of a flow run that can never finish FAILED (`desctune.registry.lineage`), asking
Prefect which flow runs have ended. Called when a finetune run starts tracking and when `desctune serve` starts, so a
run killed with SIGKILL, or one whose machine died, does not stay RUNNING in MLflow."""

from __future__ import annotations

import logging
from uuid import UUID

from desctune.registry.lineage import fail_orphaned_runs

log = logging.getLogger("desctune")


def flow_run_states(ids: list[str], api_url: str | None = None, auth_string: str | None = None) -> dict[str, str]:
    """{flow run id: state type} for the flow runs Prefect knows (the current API, or `api_url` with `auth_string`);
    {} when Prefect cannot be asked, so only the process check applies."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    uuids = []
    for i in ids:
        try:
            uuids.append(UUID(i))
        except ValueError:
            continue
    if not uuids:
        return {}
    settings = {PREFECT_API_URL: api_url} if api_url else {}
    if auth_string:
        settings[PREFECT_API_AUTH_STRING] = auth_string
    try:
        with temporary_settings(updates=settings), get_client(sync_client=True) as prefect:
            runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=uuids)))
    except Exception as exc:  # noqa: BLE001 - an unreachable Prefect must not stop a run from starting
        log.warning("could not read flow run states from Prefect (%s): judging MLflow runs by their process only",
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return {}
    return {str(r.id): r.state.type.value for r in runs if r.state is not None}


def fail_crashed_runs(tracking_uri: str, api_url: str | None = None, logger=None, auth_string: str | None = None
                      ) -> list[tuple[str, str]]:
    """Mark FAILED the RUNNING MLflow runs whose process is gone or whose Prefect flow run has ended; log each."""
    failed = fail_orphaned_runs(tracking_uri, lambda ids: flow_run_states(ids, api_url, auth_string))
    for run_id, why in failed:
        (logger or log).warning("marked MLflow run %s FAILED: %s", run_id, why)
    return failed
