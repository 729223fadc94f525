"""The `desctune` command: run, prepare, evaluate, promote, rollback, export, serve, ui, demo.

Errors a user can fix print one plain line and exit 2; tracebacks are for bugs. Each subcommand lives in its own
module with an `add_parser(subparsers)`; this file only puts them together.
"""

from __future__ import annotations

import argparse
import sys

from app import demo, export, prepare, registry, run, serve, ui
from app.runtime import unwrap, user_errors

COMMANDS = (run, prepare, registry, export, serve, ui, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desctune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


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
