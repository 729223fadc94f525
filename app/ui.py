"""`desctune ui`: the Prefect UI and the MLflow UI of the runs `desctune run` recorded, at the addresses its links name.

    desctune ui [--config FILE] [--set SECTION.KEY=VALUE ...] [--prefect-port N] [--mlflow-port N] [--timeout S]

`desctune run` records its flow runs, through a temporary Prefect server, into a database in the artifacts folder
(`app.runtime.prefect_database`), and its MLflow runs and model versions into the profile's tracking store. Every
link between them names http://127.0.0.1:4200 (Prefect) and http://127.0.0.1:5000 (MLflow), or the ports
DESCTUNE_UI_PREFECT_PORT and DESCTUNE_UI_MLFLOW_PORT name (`desctune.localui`). This command serves, on loopback
only, a Prefect server on that database (UI and API, without the background services: it shows, it schedules
nothing) and an MLflow server on that store, there; with an MLflow tracking server as the store, only the Prefect UI
(the MLflow links name that server). Each runs in its own process group with its log under <artifacts>/ui-logs/;
Ctrl-C or SIGTERM stops both and everything they started (`app.serve.Processes`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from app.runtime import add_config_flags
from app.serve import ServePlan
from desctune.errors import ServeError

HOST = "127.0.0.1"


def make_ui_plan(cfg, prefect_port: int, mlflow_port: int, env: dict) -> ServePlan:
    """Where the two UIs listen and what they show: the run's Prefect database and MLflow store."""
    from app.runtime import prefect_database
    from desctune.store import local_root
    from desctune.tracking import tracking_uri

    art = local_root(cfg.artifacts_dir).resolve()
    return ServePlan(host=HOST, prefect_port=prefect_port, mlflow_port=mlflow_port, artifacts=art,
                     prefect_db=prefect_database(cfg.artifacts_dir), mlflow_backend=tracking_uri(cfg),
                     mlflow_artifacts=env.get("MLFLOW_ARTIFACTS_DESTINATION") or str(art / "mlruns"))


def serves_mlflow(plan: ServePlan) -> bool:
    """False when the store is an MLflow tracking server: it has its own UI, which the links name."""
    return not plan.mlflow_backend.startswith(("http:", "https:"))


def ui_commands(plan: ServePlan, env: dict) -> dict[str, tuple[list[str], dict]]:
    """The servers to start, each with its environment (stores and database there, never on a command line)."""
    from app.serve_auth import mlflow_server_env, prefect_server_env

    py = sys.executable
    prefect_env = {**prefect_server_env(env, None, plan.host, plan.prefect_port),
                   "PREFECT_API_DATABASE_CONNECTION_URL": plan.prefect_db,
                   "PREFECT_SERVER_ANALYTICS_ENABLED": env.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
    cmds = {"prefect-server": ([py, "-m", "prefect", "server", "start", "--host", plan.host, "--port",
                                str(plan.prefect_port), "--no-services"], prefect_env)}
    if serves_mlflow(plan):
        mlflow_env = mlflow_server_env(env, None, plan.host, plan.mlflow_port, plan.mlflow_backend,
                                       plan.mlflow_artifacts, plan.artifacts)
        cmds["mlflow-server"] = ([py, "-m", "mlflow", "server", "--host", plan.host, "--port", str(plan.mlflow_port),
                                  "--workers", "1"], mlflow_env)
    return cmds


def ui_banner(plan: ServePlan) -> str:
    from desctune.tracking import hide_password

    mlflow = (f"  MLflow UI    {plan.mlflow_url}   (store: {hide_password(plan.mlflow_backend)})"
              if serves_mlflow(plan) else
              f"  MLflow UI    {hide_password(plan.mlflow_backend)}   (the tracking server's own; not started here)")
    return "\n".join([
        "desctune ui: ready",
        f"  Prefect UI   {plan.prefect_url}   (database: {hide_password(plan.prefect_db)})",
        mlflow,
        f"  logs         {plan.artifacts / 'ui-logs'}",
        "Ctrl-C stops both.",
    ])


def run_ui(plan: ServePlan, env: dict, timeout: float) -> int:
    """Start the servers, wait until both UIs answer, print where they are, then wait for Ctrl-C or SIGTERM (or a
    server's exit, which stops the other and says why)."""
    from app.serve import Processes, check_ui_settings, http_ok, port_in_use, stopped_on_signal, ui_api_url, wait_until

    cmds = ui_commands(plan, env)
    ports = [(plan.prefect_port, "--prefect-port", "DESCTUNE_UI_PREFECT_PORT")]
    if "mlflow-server" in cmds:
        ports.append((plan.mlflow_port, "--mlflow-port", "DESCTUNE_UI_MLFLOW_PORT"))
    for port, flag, var in ports:
        if port_in_use(plan.host, port):
            raise ServeError(f"port {port} on {plan.host} is already in use (`desctune serve`, or another `desctune "
                             f"ui`?): stop it, or pick another with {flag} and set {var} to it for `desctune run` too")
    procs = Processes(plan.artifacts / "ui-logs")
    with stopped_on_signal(procs, "desctune ui: stopping MLflow and Prefect ..."):
        for name, (argv, child_env) in cmds.items():
            procs.start(name, argv, child_env)
        wait_until(lambda: http_ok(f"{plan.api_url}/health"), f"Prefect server at {plan.prefect_url}", procs, timeout)
        wait_until(lambda: ui_api_url(plan.prefect_url) is not None, f"Prefect UI at {plan.prefect_url}", procs,
                   timeout)
        check_ui_settings(plan, env)
        if "mlflow-server" in cmds:
            wait_until(lambda: http_ok(f"{plan.mlflow_url}/health"), f"MLflow server at {plan.mlflow_url}", procs,
                       timeout)
        print(ui_banner(plan), flush=True)
        while True:
            procs.check()
            time.sleep(1)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from app.runtime import config_from_args
    from desctune import localui

    cfg = config_from_args(args)
    ports = {}
    for which, given, flag in (("prefect", args.prefect_port, "--prefect-port"),
                               ("mlflow", args.mlflow_port, "--mlflow-port")):
        ports[which] = localui.port(which) if given is None else given
        if not 1 <= ports[which] <= 65535:
            raise ServeError(f"{flag} {ports[which]}: a port is a number from 1 to 65535")
    env = dict(os.environ)
    return run_ui(make_ui_plan(cfg, ports["prefect"], ports["mlflow"], env), env, args.timeout)


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="the Prefect and MLflow UIs of `desctune run`'s runs, where its links lead; "
                                  "Ctrl-C stops them")
    add_config_flags(p)
    p.add_argument("--prefect-port", type=int, default=None,
                   help="Prefect UI port (default: $DESCTUNE_UI_PREFECT_PORT, else 4200: what the links name)")
    p.add_argument("--mlflow-port", type=int, default=None,
                   help="MLflow UI port (default: $DESCTUNE_UI_MLFLOW_PORT, else 5000: what the links name)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for each server to be ready")
    p.set_defaults(func=cmd_ui)
