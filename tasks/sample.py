"""The sample task: the seeded train/val/test split and train sample of the clean records (`desctune.sample`)."""

from __future__ import annotations

from prefect import task

from desctune.config import DataConfig
from desctune.sample import SAMPLE_FIELDS, sample_file
from desctune.stages import code_version, stage_folder
from tasks.stage import STAGE_CACHE

CODE = code_version("sample")


@task(name="sample", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def sample(clean: dict, data: DataConfig, artifacts_dir: str, code: str = CODE) -> dict:
    """Split and sample; returns per split {path, sha256, rows}."""
    return sample_file(clean, data, stage_folder(artifacts_dir, "sample", clean["sha256"], data.subset(SAMPLE_FIELDS)))
