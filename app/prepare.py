"""`desctune prepare`: run the flow's own ingest and clean tasks on a file and leave clean.parquet and rejects.parquet.

    desctune prepare --data trn.json --out prepared/ [--config FILE] [--no-filters]

Stage outputs and Prefect's cached results live under DIR, so a rerun on the same content is instant and deleting
DIR forgets both. Exit 0 when the input was usable (even with rejects), 2 with one line when it was not.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def _publish(src: str, dest: Path) -> None:
    """Put a stage output at `dest` (hard link when possible, else a copy), replacing it atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _start_ingest(data, out: Path) -> None:
    """Hash the input and ingest it on a thread now, while Prefect's server starts; the flow's fingerprint and ingest
    tasks take what it computed (`desctune.ingest.ingest_early`). Nothing is ingested when the stage folder holds its
    output already: then the task's cache answers."""
    from desctune.ingest import ingest_early, ingest_folder

    def folder_for(input_sha256: str) -> Path | None:
        folder = ingest_folder(str(out), data, input_sha256)
        return None if (folder / "raw.parquet").exists() else folder

    ingest_early(data, folder_for)


def summary(raw: dict, cleaned: dict) -> str:
    lines = [
        f"lines read {raw['lines_read']}, kept {cleaned['kept']}, rejected {cleaned['rejected']}, "
        f"duplicates {cleaned['duplicates']}"
    ]
    lines += [f"  rejected {reason}: {n}" for reason, n in cleaned["by_reason"].items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from app.apiserver import EarlyServer
    from app.runtime import prefect_env, quiet_user_errors
    from desctune.config import load_config
    from desctune.ingest import check_source

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    cfg = load_config(args.config, [])
    data = cfg.data.model_copy(update={"path": str(args.data), "filters": cfg.data.filters and not args.no_filters})
    check_source(data.path)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prefect_env(str(out))
    # Prefect's temporary server starts now, in its own process, while this one imports Prefect and the flow and a
    # thread hashes and ingests the input (on worker processes for a large file); the fingerprint and ingest tasks
    # then take what it computed.
    server = EarlyServer()
    try:
        _start_ingest(data, out)
        from flows.prepare import prepare

        quiet_user_errors()
        with server.use():
            raw, cleaned = prepare(data, str(out))
    finally:
        server.stop()
    _publish(cleaned["path"], out / "clean.parquet")
    _publish(cleaned["rejects_path"], out / "rejects.parquet")
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
    p.set_defaults(func=main)
