"""The sample task: the seeded train/val/test split and train sample of the clean records (`desctune.data.sample`)."""

from __future__ import annotations

from prefect import task

from desctune.config import DataConfig
from desctune.data.sample import SAMPLE_FIELDS, sample_file
from desctune.stages import code_version, stage_folder
from desctune.store import localize, publish
from tasks.stage import STAGE_CACHE

CODE = code_version("sample")


@task(name="sample", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def sample(clean: dict, data: DataConfig, artifacts_dir: str, code: str = CODE) -> dict:
    """Split and sample; returns per split {path, sha256, rows}."""
    out_dir = stage_folder(artifacts_dir, "sample", clean["sha256"], data.subset(SAMPLE_FIELDS))
    return publish(artifacts_dir, out_dir, sample_file(localize(artifacts_dir, clean), data, out_dir))
