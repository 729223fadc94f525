"""`desctune run`: the finetune flow on a profile, then the run summary.

    desctune run [--config FILE] [--set SECTION.KEY=VALUE ...] [--refresh]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from desctune.errors import DataError


def preflight(cfg) -> None:
    """Catch the commonest mistakes before any server or model starts."""
    from desctune import store
    from desctune.data.readers import HF_PREFIX
    from desctune.tracking import tracking_uri

    for key, path in (("data.path", cfg.data.path), ("eval.test_path", cfg.eval.test_path)):
        if path and not path.startswith(HF_PREFIX) and not Path(path).exists():
            raise DataError(f"{key} {path} does not exist: point it at a JSON Lines, CSV or Parquet file, a Hugging "
                            "Face save_to_disk folder, or hf://owner/name")
    store.check(cfg.artifacts_dir)
    tracking_uri(cfg)


def main(args: argparse.Namespace) -> int:
    from app.apiserver import EarlyServer
    from app.runtime import password_to_env, prefect_database, prefect_env, quiet_user_errors
    from desctune import localui
    from desctune.config import load_config

    cfg = password_to_env(load_config(args.config, args.set))
    preflight(cfg)
    prefect_env(cfg.artifacts_dir)
    if args.refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    # Without a configured API, Prefect's temporary server starts now, in its own process, while this one imports
    # Prefect and the flow; it dies with this process, however that ends. It records into a database in the artifacts
    # folder, which `desctune ui` serves at the address the run's links name.
    server = EarlyServer(env={"PREFECT_API_DATABASE_CONNECTION_URL": prefect_database(cfg.artifacts_dir)},
                         ui_url=localui.url("prefect"))
    try:
        from app.summary import summary_text
        from flows.finetune import finetune
        from tasks.stage import result_storage

        storage = result_storage(cfg.artifacts_dir)
        flow = finetune if storage is None else finetune.with_options(result_storage=storage)
        quiet_user_errors()
        with server.use():
            state = flow(config=cfg, return_state=True)
            result = state.result()
    finally:
        server.stop()
    print(summary_text(result, str(state.state_details.flow_run_id), ui_command(args)))
    return 0


def ui_command(args: argparse.Namespace) -> str:
    """The `desctune ui` command that shows what this run recorded: the same profile, artifacts folder and registry."""
    import shlex

    from desctune.tracking import hide_password

    flags = [*(["--config", args.config] if args.config else []),
             *(x for s in args.set if s.startswith(("artifacts_dir=", "registry.")) for x in ("--set", s))]
    return hide_password(shlex.join([".venv/bin/desctune", "ui", *flags]))


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the finetune flow (ingest -> ... -> register)")
    p.add_argument("--config", help="YAML profile (default: the built-in CPU defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field")
    p.add_argument("--refresh", action="store_true", help="recompute every stage instead of reusing cached ones")
    p.set_defaults(func=main)
