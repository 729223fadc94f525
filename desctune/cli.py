"""The `desctune` command: run, prepare, evaluate, promote, rollback, serve, demo.

Errors a user can fix print one plain line and exit 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from desctune.errors import UserError


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user."""
    return (UserError, FileNotFoundError)


def prefect_env(artifacts_dir: str) -> None:
    """Keep Prefect's cached task results next to the artifacts they describe, so deleting one deletes both."""
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(artifacts_dir).resolve() / "prefect-results"))


class HideUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for errors the user can fix, the one-line message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(unwrap(record.exc_info[1]), user_errors()):
            record.exc_info, record.exc_text = None, None
        return True


def preflight(cfg) -> None:
    """Catch the commonest mistakes before any server or model starts."""
    data = Path(cfg.data.path)
    if not data.is_file():
        raise UserError(f"data.path {data} does not exist: point it at a trn.json / .jsonl(.gz) file")


def cmd_run(args: argparse.Namespace) -> int:
    from desctune.config import load_config

    cfg = load_config(args.config, args.set)
    preflight(cfg)
    prefect_env(cfg.artifacts_dir)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HideUserErrorTracebacks())
    if args.refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from desctune.summary import summary_text
    from flows.finetune import finetune

    state = finetune(config=cfg, return_state=True)
    print(summary_text(state.result(), str(state.state_details.flow_run_id)))
    return 0


def add_run(sub) -> None:
    p = sub.add_parser("run", help="run the finetune flow (ingest -> ... -> register)")
    p.add_argument("--config", help="YAML profile (default: the built-in CPU defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field")
    p.add_argument("--refresh", action="store_true", help="recompute every stage instead of reusing cached ones")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desctune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_run(sub)
    from desctune import prepare

    prepare.add_parser(sub)
    return parser


def unwrap(exc: BaseException) -> BaseException:
    """Prefect re-raises task failures; find the user error inside, if there is one."""
    seen = exc
    while seen is not None:
        if isinstance(seen, user_errors()):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("desctune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        err = unwrap(exc)
        if isinstance(err, user_errors()):
            print(f"desctune: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
