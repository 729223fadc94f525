"""What every stage task shares besides its folder (`desctune.stages`): the cache policy, when to retry, where its
log lines and counts go.

Prefect's default policy includes the flow run id, so nothing would be reused between runs. Stages use
INPUTS + TASK_SOURCE with persisted results; TASK_SOURCE hashes only the task function's own text, so each stage
also takes `code=code_version(stage)` as a default argument. Every stage's policy is wrapped in `OutputsPresent`: a
cached result is forgotten when a file it declares is gone (deleted by hand, or never reached the disk; on an object
store: its folder has no publication marker) or is not the file written (its size or sha256 differ: edited, damaged),
so the stage runs again instead of handing the next stage paths that do not exist or contents nobody computed. The
stages after it follow: their keys hold the hashes of what it returns.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.filesystems import RemoteFileSystem

from desctune import localui
from desctune.errors import StoreError, UserError
from desctune.results import StageFile, locations
from desctune.store import (fetch, is_published, is_url, localize, refetch, store_hash, store_paths, store_url,
                            unit_of)


def output_problem(result: Any, artifacts_dir: str) -> tuple[str, str] | None:
    """The first file a cached result declares (`desctune.results`) that cannot be reused, and why: "missing" (gone;
    on an object store, in a folder with no publication marker) or how it changed since it was written. On a store
    the files are checked as this worker reads them, in its mirror (fetched first where it lacks them): a mirror copy
    that changed is fetched again from the store before the result is given up."""
    if not is_url(artifacts_dir):
        for file in locations(result):
            if isinstance(file, StageFile) and (why := file.changed()):
                return file.path, why
        return None
    url = store_url(artifacts_dir)
    for unit in dict.fromkeys(unit_of(rel) for rel in store_paths(artifacts_dir, result)):
        if not is_published(artifacts_dir, unit):
            return f"{url}/{unit}", "missing"
        try:
            fetch(artifacts_dir, unit)
        except StoreError:  # a file in the store that does not match the folder's marker
            return f"{url}/{unit}", "its files in the store do not match the folder's publication marker"
    for stored, file in zip(locations(result), locations(localize(artifacts_dir, result))):
        if isinstance(file, StageFile) and file.changed():
            refetch(artifacts_dir, unit_of(stored.path[len(url) + 1:]))
            if why := file.changed():
                return stored.path, why
    return None


def reusable(result: Any, artifacts_dir: str, stage: str) -> bool:
    """Whether a kept result's files are all there as written; if not, one log line says which file and why."""
    problem = output_problem(result, artifacts_dir)
    if problem is None:
        return True
    path, why = problem
    if why == "missing":
        run_logger().warning("the cached result names %s, which no longer exists: running the stage again", path)
    else:
        run_logger().warning("%s changed since it was written (%s); recomputing %s", path, why, stage)
    return False


def forget_if_outputs_changed(store, key: str, artifacts_dir: str, stage: str) -> None:
    """Drop the cached result under `key` when a file it declares is gone or is not the one written (size or sha256;
    on an object store, also a folder without its marker)."""
    try:
        if not store.exists(key):
            return
        result = store.read(key).result
    except Exception:  # noqa: BLE001 - Prefect treats an unreadable record as no record, and runs the task
        return
    if reusable(result, artifacts_dir, stage):
        return
    for storage in {id(s): s for s in (store.metadata_storage, store.result_storage) if s is not None}.values():
        resolve = getattr(storage, "_resolve_path", None)  # Prefect's storages have no delete
        if isinstance(storage, RemoteFileSystem):
            with contextlib.suppress(FileNotFoundError):
                storage.filesystem.rm_file(resolve(key))
        elif resolve is not None:
            Path(resolve(key)).unlink(missing_ok=True)


@dataclass
class OutputsPresent(CachePolicy):
    """`policy`'s key, after forgetting a cached result whose stage files are gone or changed (then the task runs
    again and its new result is cached under the same key)."""

    policy: CachePolicy | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        key = self.policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        if key is not None and inputs.get("artifacts_dir") and getattr(task_ctx, "result_store", None) is not None:
            forget_if_outputs_changed(task_ctx.result_store, key, str(inputs["artifacts_dir"]), task_ctx.task.name)
        return key


def stage_cache(policy: CachePolicy) -> OutputsPresent:
    return OutputsPresent(policy=policy)


STAGE_CACHE = stage_cache(INPUTS + TASK_SOURCE)


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


def prefect_ui_url() -> str:
    """The UI of the Prefect server this process reports to: PREFECT_UI_URL, which Prefect derives from
    PREFECT_API_URL and `desctune run` sets to `desctune ui`'s address; without either, the API is a temporary server
    Prefect started itself, without a UI, so `desctune ui`'s Prefect UI (`desctune.localui`)."""
    from prefect.settings import PREFECT_UI_URL

    return (PREFECT_UI_URL.value() or localui.url("prefect")).rstrip("/")


def flow_run_tags() -> dict:
    """The current Prefect flow run's id, name and UI link, as MLflow lineage tags (empty outside a flow run)."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    ui = prefect_ui_url()
    return {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name or "",
            "prefect.flow_run_url": f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}"}


def result_storage(artifacts_dir: str) -> str | None:
    """Where a flow on an object-store artifacts_dir keeps Prefect's task results, i.e. the stage cache: the store's
    prefect-results/, through fsspec, so every worker finds what the others computed. Prefect wants a flow's result
    storage saved as a block: `remote-file-system/desctune-results-<store hash>` (it holds only the URL; credentials
    come from the environment). None for a local folder."""
    if not is_url(artifacts_dir):
        return None
    name = f"desctune-results-{store_hash(artifacts_dir)}"
    RemoteFileSystem(basepath=store_url(artifacts_dir) + "/prefect-results").save(name, overwrite=True)
    return f"remote-file-system/{name}"
