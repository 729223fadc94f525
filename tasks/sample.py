"""The sample task: the seeded train/val/test split and train sample of the clean records (`desctune.data.sample`)."""

from __future__ import annotations

from prefect import task

from desctune.config import DataConfig
from desctune.data.sample import SAMPLE_FIELDS, sample_file
from desctune.results import CleanResult, SampleResult
from desctune.stages import code_version, stage_folder
from desctune.store import localize, publish
from tasks.stage import STAGE_CACHE

CODE = code_version("sample")


@task(name="sample", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def sample(clean: CleanResult, data: DataConfig, artifacts_dir: str, code: str = CODE) -> SampleResult:
    """Split and sample; returns each split's file and rows."""
    out_dir = stage_folder(artifacts_dir, "sample", clean.clean.sha256, data.subset(SAMPLE_FIELDS))
    result = sample_file(localize(artifacts_dir, clean).core(), data, out_dir)
    return publish(artifacts_dir, out_dir, SampleResult.from_core(result))
