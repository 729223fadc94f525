"""What every stage task shares besides its folder (`desctune.stages`): the cache policy, when to retry, where its
log lines and counts go.

Prefect's default policy includes the flow run id, so nothing would be reused between runs. Stages use
INPUTS + TASK_SOURCE with persisted results; TASK_SOURCE hashes only the task function's own text, so each stage
also takes `code=code_version(stage)` as a default argument. Every stage's policy is wrapped in `OutputsPresent`: a
cached result whose files in the stage folder are gone (deleted by hand, or never reached the disk; on an object store:
whose folder has no publication marker) is forgotten, so
the stage runs again instead of handing the next stage paths that do not exist.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.filesystems import RemoteFileSystem

from desctune.errors import UserError
from desctune.store import is_published, is_url, store_hash, store_paths, store_url, unit_of


def output_paths(result: Any, artifacts_dir: str) -> list[Path]:
    """The files a stage's result names (values of `path` and `*_path` keys, at any depth) in the stage folders."""
    stages = Path(artifacts_dir).resolve() / "stages"
    found: list[Path] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and (key == "path" or key.endswith("_path")):
            path = Path(value).resolve()
            if stages in path.parents:
                found.append(path)

    walk(result)
    return found


def missing_outputs(result: Any, artifacts_dir: str) -> list[Path | str]:
    """The files (local folder) or unpublished folders (object store: no marker) a cached result names."""
    if is_url(artifacts_dir):
        units = dict.fromkeys(unit_of(rel) for rel in store_paths(artifacts_dir, result))
        return [f"{store_url(artifacts_dir)}/{u}" for u in units if not is_published(artifacts_dir, u)]
    return [p for p in output_paths(result, artifacts_dir) if not p.exists()]


def forget_if_outputs_missing(store, key: str, artifacts_dir: str) -> list[Path]:
    """Drop the cached result under `key` when a file (or, on an object store, a published folder) it names is gone;
    returns what is missing."""
    try:
        if not store.exists(key):
            return []
        result = store.read(key).result
    except Exception:  # noqa: BLE001 - Prefect treats an unreadable record as no record, and runs the task
        return []
    missing = missing_outputs(result, artifacts_dir)
    if missing:
        for storage in {id(s): s for s in (store.metadata_storage, store.result_storage) if s is not None}.values():
            resolve = getattr(storage, "_resolve_path", None)  # Prefect's storages have no delete
            if isinstance(storage, RemoteFileSystem):
                with contextlib.suppress(FileNotFoundError):
                    storage.filesystem.rm_file(resolve(key))
            elif resolve is not None:
                Path(resolve(key)).unlink(missing_ok=True)
        run_logger().warning("the cached result names %s, which no longer exists: running the stage again",
                             missing[0])
    return missing


@dataclass
class OutputsPresent(CachePolicy):
    """`policy`'s key, after forgetting a cached result whose stage files are gone (then the task runs again and
    its new result is cached under the same key)."""

    policy: CachePolicy | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        key = self.policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        if key is not None and inputs.get("artifacts_dir") and getattr(task_ctx, "result_store", None) is not None:
            forget_if_outputs_missing(task_ctx.result_store, key, str(inputs["artifacts_dir"]))
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
