"""The clean task: decode, repair and filter the raw records into clean.parquet plus rejects (`desctune.data.clean`)."""

from __future__ import annotations

from prefect import task

from desctune.config import DataConfig
from desctune.data.clean import clean_file, clean_folder
from desctune.results import CleanResult, IngestResult
from desctune.stages import code_version
from desctune.store import localize, publish
from tasks.stage import STAGE_CACHE, report_counts, run_logger

CODE = code_version("clean")


@task(name="clean", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def clean(raw: IngestResult, data: DataConfig, artifacts_dir: str, code: str = CODE) -> CleanResult:
    out_dir = clean_folder(artifacts_dir, raw.core(), data)
    result = CleanResult.from_core(clean_file(localize(artifacts_dir, raw).core(), data, out_dir))
    run_logger().info("cleaned: %d kept, %d rejected (%d duplicates)", result.kept, result.rejected, result.duplicates)
    rows = [{"count": k, "value": getattr(result, k)} for k in ("lines_read", "kept", "rejected", "duplicates")]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in result.by_reason.items()]
    report_counts("clean counts", rows, "clean-counts")
    return publish(artifacts_dir, out_dir, result)
