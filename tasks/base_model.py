"""The base-model task: provision the base checkpoint (`desctune.models.provision`), retried on network trouble."""

from __future__ import annotations

from prefect import task

from desctune.models import provision
from tasks.stage import retry_unless_user_error


@task(name="base-model", retries=2, retry_condition_fn=retry_unless_user_error, retry_delay_seconds=[5, 30])
def base_model(name: str, artifacts_dir: str) -> dict:
    """Provision the base checkpoint (idempotent: the converted checkpoint is its own cache)."""
    return provision(name, artifacts_dir)
