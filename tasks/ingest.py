"""The ingest task: stream the input file into raw.parquet plus its rejects (`desctune.data.ingest`), cached by the
file's content hash and the data settings that change the output."""

from __future__ import annotations

from prefect import task

from desctune.config import DataConfig
from desctune.data.ingest import ingest_file, ingest_folder, source_fingerprint
from desctune.results import IngestResult
from desctune.stages import code_version
from desctune.store import publish
from tasks.stage import STAGE_CACHE, report_counts, run_logger

CODE = code_version("ingest")


@task(name="fingerprint")
def fingerprint(path: str) -> str:
    """sha256 of the input (file, dataset folder or hub dataset), so ingest's cache follows content, not name."""
    return source_fingerprint(path)


@task(name="ingest", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def ingest(data: DataConfig, artifacts_dir: str, input_sha256: str, code: str = CODE) -> IngestResult:
    out_dir = ingest_folder(artifacts_dir, data, input_sha256)
    result = IngestResult.from_core(ingest_file(data, out_dir) | {"input_sha256": input_sha256})
    run_logger().info(
        "ingested %s: %d lines read, %d records, %d rejected", data.path, result.lines_read, result.records,
        result.rejected,
    )
    rows = [{"count": k, "value": getattr(result, k)} for k in ("lines_read", "records", "rejected")]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in result.by_reason.items()]
    report_counts("ingest counts", rows, "ingest-counts")
    return publish(artifacts_dir, out_dir, result)
