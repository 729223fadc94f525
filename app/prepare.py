"""`desctune prepare`: run the ingest and clean stages on a file and leave clean.parquet and rejects.parquet.

    desctune prepare --data trn.json --out prepared/ [--config FILE] [--no-filters] [--prefect]

With a Prefect API configured (PREFECT_API_URL or a Prefect profile), or with --prefect (a temporary server where none
is configured), the stages run as the prepare flow's tasks, so the run shows in Prefect's UI. Otherwise they run in
this process: the same functions and stage folders, without the CPU time a temporary Prefect server and its
client cost, a server whose record of the run no one would look at. Stage outputs and cached results live under DIR
(Prefect's results, or each stage folder's result.json), so a rerun on the same content is instant and deleting DIR
forgets both. Exit 0 when the input was usable (even with rejects), 2 with one line when it was not.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from desctune.results import CleanResult, IngestResult

R = TypeVar("R")


def _publish(src: str, dest: Path) -> None:
    """Put a stage output at `dest` (hard link when possible, else a copy), replacing it atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


# What a stage run in this process keeps in its folder, written last: its result, as Prefect's task cache keeps it.
STAGE_RESULT = "result.json"


def kept_or_run(folder: Path, out: Path, stage: str, kind: type[R], run: Callable[[], R]) -> R:
    """The result an earlier run in this mode kept in this stage folder, unless a file it names is gone or changed
    since it was written (the rule the flow's stage cache follows, `tasks.stage.reusable`); else run() (which writes
    the folder) and keep its result there. The folder is named by the stage's inputs and code version
    (`desctune.stages.stage_folder`), so a result found there is this run's."""
    from desctune.files import atomic_path
    from tasks.stage import reusable

    marker = folder / STAGE_RESULT
    try:
        result = kind.model_validate_json(marker.read_bytes())
        if reusable(result, str(out), stage):
            return result
    except (OSError, ValueError):
        pass
    result = run()
    with atomic_path(marker) as tmp:
        tmp.write_text(result.model_dump_json(indent=1), encoding="utf-8")
    return result


def run_stages(data, out: Path) -> tuple[IngestResult, CleanResult]:
    """Ingest and clean in this process, into the folders the prepare flow's tasks use."""
    from desctune.data.clean import clean_file, clean_folder
    from desctune.data.ingest import ingest_file, ingest_folder, source_fingerprint
    from desctune.results import CleanResult, IngestResult

    sha = source_fingerprint(data.path)
    raw_dir = ingest_folder(str(out), data, sha)
    raw = kept_or_run(raw_dir, out, "ingest", IngestResult,
                      lambda: IngestResult.from_core(ingest_file(data, raw_dir) | {"input_sha256": sha}))
    clean_dir = clean_folder(str(out), raw.core(), data)
    return raw, kept_or_run(clean_dir, out, "clean", CleanResult,
                            lambda: CleanResult.from_core(clean_file(raw.core(), data, clean_dir)))


def prefect_api_configured() -> bool:
    """Whether Prefect has an API to report to: PREFECT_API_URL, or a profile or settings file that sets it."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def summary(raw: IngestResult, cleaned: CleanResult) -> str:
    lines = [f"lines read {raw.lines_read}, kept {cleaned.kept}, rejected {cleaned.rejected}, "
             f"duplicates {cleaned.duplicates}"]
    lines += [f"  rejected {reason}: {n}" for reason, n in cleaned.by_reason.items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from app.apiserver import EarlyServer
    from app.runtime import prefect_env, quiet_user_errors
    from desctune.config import load_config
    from desctune.data.readers import check_source

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    cfg = load_config(args.config, [])
    data = cfg.data.model_copy(update={"path": str(args.data), "filters": cfg.data.filters and not args.no_filters})
    check_source(data.path)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prefect_env(str(out))
    # With --prefect, Prefect's temporary server starts now, in its own process, while this one imports Prefect and
    # the flow.
    server = EarlyServer() if args.prefect else None
    try:
        if server is None and not prefect_api_configured():
            raw, cleaned = run_stages(data, out)
        else:
            from flows.prepare import prepare

            quiet_user_errors()
            server = server or EarlyServer()  # Prefect is loaded: starts nothing, use() keeps the configured API
            with server.use():
                raw, cleaned = prepare(data, str(out))
    finally:
        if server is not None:
            server.stop()
    _publish(cleaned.clean.path, out / "clean.parquet")
    _publish(cleaned.rejects.path, out / "rejects.parquet")
    print(summary(raw, cleaned))
    print(f"wrote {out / 'clean.parquet'} and {out / 'rejects.parquet'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="ingest and clean a data file into DIR/clean.parquet + rejects.parquet")
    p.add_argument("--data", required=True,
                   help="JSON Lines or a JSON array (.json/.jsonl, .gz), CSV (.csv/.tsv), Parquet, "
                   "a Hugging Face save_to_disk folder, or hf://owner/name[:split]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="YAML profile whose data section applies (field names, caps, filters)")
    p.add_argument("--no-filters", action="store_true", help="turn off the length filters, nothing else")
    p.add_argument("--prefect", action="store_true",
                   help="run as the prepare flow on Prefect even with no API configured (a temporary server, in "
                   "Prefect's local database); with one configured it always does")
    p.set_defaults(func=main)
