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


USER_ERROR_NAMES = ("ConfigError", "DataError", "ModelError", "AdapterError", "UserError", "FileNotFoundError")


def prefect_env(artifacts_dir: str) -> None:
    """Keep Prefect's cached task results next to the artifacts they describe, so deleting one deletes both."""
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(artifacts_dir).resolve() / "prefect-results"))


class HideUserErrors(logging.Filter):
    """Drop Prefect's log records about a user-fixable error (tracebacks included): the CLI prints it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(unwrap(exc), user_errors()):
            return False
        message = record.getMessage()
        return not any(f"{name}(" in message or f"{name}:" in message for name in USER_ERROR_NAMES)


def quiet_user_errors() -> None:
    """Attach HideUserErrors to every handler Prefect has set up."""
    hide = HideUserErrors()
    for name in ["", *logging.Logger.manager.loggerDict]:
        for handler in getattr(logging.getLogger(name), "handlers", []):
            if not any(isinstance(f, HideUserErrors) for f in handler.filters):
                handler.addFilter(hide)


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
    if args.refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from desctune.summary import summary_text
    from flows.finetune import finetune

    quiet_user_errors()

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
    from desctune.serve import add_serve

    add_serve(sub)
    from desctune.demo import add_demo

    add_demo(sub)
    from desctune.registry_cli import add_registry

    add_registry(sub)
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
