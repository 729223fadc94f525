"""The prepare flow: the finetune flow's own ingest and clean tasks, for `desctune prepare`. It only composes."""

from __future__ import annotations

from prefect import flow

from desctune.config import DataConfig
from desctune.results import CleanResult, IngestResult
from tasks.clean import clean
from tasks.ingest import fingerprint, ingest


@flow(name="prepare", log_prints=True)
def prepare(data: DataConfig, artifacts_dir: str) -> tuple[IngestResult, CleanResult]:
    """Ingest and clean one data file; returns the two stages' results."""
    raw = ingest(data, artifacts_dir, fingerprint(data.path))
    return raw, clean(raw, data, artifacts_dir)
