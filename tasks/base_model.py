"""The base-model task: provision the base checkpoint (`desctune.models.provision`), retried on network trouble."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from desctune.models import provision
from desctune.results import BaseModelResult
from desctune.store import is_url, local_root, publish
from tasks.stage import retry_unless_user_error


@task(name="base-model", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=[5, 30])
def base_model(name: str, artifacts_dir: str) -> BaseModelResult:
    """Provision the base checkpoint (idempotent: the converted checkpoint is its own cache); on an object store
    a converted checkpoint is published there, so its path is the same on every worker."""
    base = BaseModelResult.from_core(provision(name, artifacts_dir))
    if is_url(artifacts_dir) and local_root(artifacts_dir).resolve() in Path(base.checkpoint.path).parents:
        return publish(artifacts_dir, base.checkpoint.path, base)
    return base
