"""`desctune demo`: the Streamlit side-by-side app, on 127.0.0.1 unless told otherwise.

    desctune demo [--host 127.0.0.1] [--port 8501] [--model REF] [--config FILE]

REF is `models:/NAME@ALIAS`, `models:/NAME/VERSION` or an adapter folder (default: the configured model @champion).
Served on a non-loopback --host, the page's sidebar takes registry references only, never a folder on the server.
The process becomes the Streamlit server (headless, no usage statistics, no browser opened), so stopping it stops
the app.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
from pathlib import Path

from desctune.errors import UserError

PAGE = Path(__file__).resolve().parent / "demo_page.py"


def streamlit_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(PAGE),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
    ]


def check_port(host: str, port: int) -> None:
    """Fail with one line when the address cannot be bound, before Streamlit prints its own traceback."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port or --host") from None


def main(args: argparse.Namespace) -> int:
    from desctune.config import load_config
    from desctune.registry.modelref import parse_ref

    cfg = load_config(args.config, [])
    if importlib.util.find_spec("streamlit") is None:
        raise UserError("the demo needs Streamlit: pip install -e '.[demo]'")
    env = dict(os.environ)
    env["DESCTUNE_DEMO_HOST"] = args.host  # a page served beyond loopback loads registry references only
    if args.config:
        env["DESCTUNE_DEMO_CONFIG"] = str(Path(args.config).resolve())
    if args.model:
        if parse_ref(args.model) is None:
            if not Path(args.model).is_dir():
                raise UserError(f"--model {args.model}: no such adapter folder (or use models:/NAME@ALIAS)")
            args.model = str(Path(args.model).resolve())
        env["DESCTUNE_DEMO_MODEL"] = args.model
    check_port(args.host, args.port)
    print(f"desctune demo: http://{args.host}:{args.port} (model {args.model or cfg.registry.model_name + '@champion'})",
          flush=True)
    cmd = streamlit_command(args.host, args.port)
    os.execve(cmd[0], cmd, env)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="Streamlit app: base vs fine-tuned descriptions side by side")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder (default: @champion)")
    p.add_argument("--config", help="YAML profile: which registry, tracking store and artifacts folder to use")
    p.set_defaults(func=main)
