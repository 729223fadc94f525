"""`desctune serve`: a Prefect server, a worker on the `desctune-local` pool and an MLflow tracking server, deployed.

Each server runs in its own process group with its log under <artifacts>/serve-logs/, so Ctrl-C (or SIGTERM) stops
every process they started, in order, and nothing is left behind. A worker that dies is started again, unless the
restarted one dies within a minute (the automation `deploy` creates marks the dead worker's runs Crashed once their
heartbeats stop); any other child's exit stops `serve`. Before the worker starts, the MLflow runs that crashed flow
runs left RUNNING are marked FAILED (`tasks.crashed`). A lock file in the artifacts folder makes a second `serve` on
the same folder say so in one line; a port check does the same for a port another program holds.
Backends: Prefect uses PREFECT_API_DATABASE_CONNECTION_URL when set (else its SQLite default under PREFECT_HOME);
MLflow uses MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION when set (else sqlite:///<artifacts>/mlflow.db
and <artifacts>/mlruns). Both reach the servers through their environment, never their command lines.
Credentials (app/serve_auth.py): a non-loopback --host needs DESCTUNE_SERVE_PASSWORD (or _FILE); loopback may use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from app.serve_auth import (
    Credentials,
    check_exposure,
    client_env,
    credentials,
    mlflow_server_env,
    prefect_server_env,
    served_hosts,
)
from desctune.errors import ServeError

ROOT = Path(__file__).resolve().parents[1]
WORKER_MIN_UPTIME = 60  # seconds: a restarted worker that dies sooner would only die again, so serve stops instead


def _pool() -> str:
    """The local work pool's name. Imported when used: `deployments.deploy` brings pandas and the stage store along,
    and every `desctune` command imports this module (that import was 90% of the command line's start)."""
    from deployments.deploy import POOL

    return POOL


@dataclass(frozen=True)
class ServePlan:
    """Where everything listens and stores; built from the command line and the environment."""

    host: str
    prefect_port: int
    mlflow_port: int
    artifacts: Path
    prefect_db: str | None
    mlflow_backend: str
    mlflow_artifacts: str
    creds: Credentials | None = None

    @property
    def url_host(self) -> str:
        """The host in every URL serve prints or hands out: this machine's name for a wildcard bind (0.0.0.0, ::),
        an address no browser and no other machine can use."""
        return served_hosts(self.host)[0]

    @property
    def prefect_url(self) -> str:
        return f"http://{self.url_host}:{self.prefect_port}"

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.url_host}:{self.mlflow_port}"


def make_plan(host: str, prefect_port: int, mlflow_port: int, artifacts: str | Path, env: dict) -> ServePlan:
    """Where everything goes; a ServeError when `host` is not loopback and no credentials are configured."""
    creds = credentials(env)
    check_exposure(host, creds)
    art = Path(artifacts).resolve()
    return ServePlan(
        host=host,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        artifacts=art,
        prefect_db=env.get("PREFECT_API_DATABASE_CONNECTION_URL") or None,
        mlflow_backend=env.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{art / 'mlflow.db'}",
        mlflow_artifacts=env.get("MLFLOW_ARTIFACTS_DESTINATION") or str(art / "mlruns"),
        creds=creds,
    )


def commands(plan: ServePlan, env: dict) -> dict[str, tuple[list[str], dict]]:
    """The three long-running processes, each with its own environment: the servers get their stores and secrets
    there (not on their command lines), the worker only the servers' URLs and the clients' credentials."""
    py = sys.executable
    worker_env = {
        **client_env(env, plan.creds, plan.api_url, plan.mlflow_url),
        "PREFECT_WORKER_QUERY_SECONDS": env.get("PREFECT_WORKER_QUERY_SECONDS", "5"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(plan.artifacts / "prefect-results"),
    }
    mlflow_env = mlflow_server_env(env, plan.creds, plan.host, plan.mlflow_port, plan.mlflow_backend,
                                   plan.mlflow_artifacts, plan.artifacts)
    auth_app = ["--app-name", "basic-auth"] if plan.creds else []
    return {
        # `prefect server start` with the deployment job-variable check (app/serve_auth.py) around its app
        "prefect-server": ([py, "-m", "app.serve_auth", "--host", plan.host, "--port", str(plan.prefect_port)],
                           prefect_server_env(env, plan.creds, plan.host, plan.prefect_port)),
        "mlflow-server": ([py, "-m", "mlflow", "server", "--host", plan.host, "--port", str(plan.mlflow_port),
                           "--workers", "1", *auth_app], mlflow_env),
        "worker": ([py, "-m", "prefect", "worker", "start", "--pool", _pool(), "--type", "process",
                    "--name", f"{_pool()}-{socket.gethostname()}-{os.getpid()}"], worker_env),
    }


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0



class Processes:
    """Children started in their own process groups, stopped in reverse order with every descendant."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.revived: set[str] = set()

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        self.started[name] = time.monotonic()
        return proc

    def revive(self, name: str, argv: list[str], env: dict, min_uptime: float) -> bool:
        """Start `name` again when it has exited, unless it was itself a restart that lived less than `min_uptime`
        seconds (it would only die again; `check` then reports it); True when it did. Call it only once `name` has
        proved it works (serve does after the worker's first poll)."""
        proc = self.procs[name]
        if proc.poll() is None or (name in self.revived and time.monotonic() - self.started[name] < min_uptime):
            return False
        print(f"desctune serve: {name} exited with code {proc.returncode} ({self.last_line(name)}); starting a new "
              f"one (log: {self.logs / (name + '.log')})", file=sys.stderr, flush=True)
        self.start(name, argv, env)
        self.revived.add(name)
        return True

    def last_line(self, name: str) -> str:
        try:
            lines = [l for l in (self.logs / f"{name}.log").read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ServeError(f"{name} exited with code {proc.returncode}: {self.last_line(name)} "
                                 f"(log: {self.logs / (name + '.log')})")

    def stop(self, timeout: float = 20) -> None:
        import psutil

        for name, proc in reversed(list(self.procs.items())):
            try:
                family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                family = [proc.pid]
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
            _, alive = psutil.wait_procs(_existing(family), timeout=5)
            for p in alive:
                p.kill()
            psutil.wait_procs(alive, timeout=5)
        self.procs.clear()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _existing(pids: list[int]) -> list:
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def _get(url: str, creds: Credentials | None):
    request = urllib.request.Request(url, headers={"Authorization": creds.header} if creds else {})
    return urllib.request.urlopen(request, timeout=2)


def http_ok(url: str, creds: Credentials | None = None) -> bool:
    try:
        with _get(url, creds) as r:
            return r.status == 200
    except Exception:
        return False


def pool_ready(api_url: str, creds: Credentials | None = None) -> bool:
    """True once a worker has polled the pool (Prefect then marks it READY)."""
    try:
        with _get(f"{api_url}/work_pools/{_pool()}", creds) as r:
            return json.load(r).get("status") == "READY"
    except Exception:
        return False


def ui_api_url(prefect_url: str, creds: Credentials | None = None) -> str | None:
    """The API URL the Prefect UI's pages will call, as its `/ui-settings` tells the browser; None if it does not answer."""
    try:
        with _get(f"{prefect_url}/ui-settings", creds) as r:
            return json.load(r).get("api_url")
    except Exception:
        return None


def check_ui_settings(plan: ServePlan, env: dict) -> None:
    """The Prefect UI is only usable when it sends the browser to this server's API: a health check of the API alone
    passes while every page says "Can't connect to Server API"."""
    expected = prefect_server_env(env, plan.creds, plan.host, plan.prefect_port)["PREFECT_UI_API_URL"]
    got = ui_api_url(plan.prefect_url, plan.creds)
    if got != expected:
        raise ServeError(f"the Prefect UI at {plan.prefect_url} sends browsers to the API at {got} instead of "
                         f"{expected}: its pages could not load; unset PREFECT_UI_API_URL or point it at {expected}")


def check_mlflow_login(plan: ServePlan) -> None:
    """MLflow creates its admin user once, with the password of that first start: say so when it has another one."""
    import urllib.error

    if plan.creds is None:
        return
    try:
        _get(f"{plan.mlflow_url}/api/2.0/mlflow/users/get?username={plan.creds.user}", plan.creds).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ServeError(
                f"MLflow refuses {plan.creds.user!r} with this password: its user store "
                f"({plan.artifacts / 'mlflow-auth.db'}) was created with another password or user; serve with "
                "those, or delete that file to start it again") from None
        raise ServeError(f"MLflow at {plan.mlflow_url} answered {exc.code} to its admin user's login") from None


def wait_until(ready, what: str, procs: Processes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        procs.check()
        if time.monotonic() > deadline:
            raise ServeError(f"{what} not ready after {timeout:.0f}s (logs: {procs.logs})")
        time.sleep(0.5)


def banner(plan: ServePlan, deployed: list[str], paused: list[str] = ()) -> str:
    from desctune.tracking import hide_password

    prefect_db = hide_password(plan.prefect_db) if plan.prefect_db else "SQLite under PREFECT_HOME"
    if plan.creds:
        login = (f"  login         user {plan.creds.user!r} with the serve password, on both UIs and APIs; "
                 "CSRF protection on")
        export_auth = [(f"  export PREFECT_API_AUTH_STRING=\"{plan.creds.user}:$DESCTUNE_SERVE_PASSWORD\" "
                        f"MLFLOW_TRACKING_USERNAME={plan.creds.user} "
                        "MLFLOW_TRACKING_PASSWORD=\"$DESCTUNE_SERVE_PASSWORD\"")]
    else:
        login = "  login         none (this machine only); CSRF protection on"
        export_auth = []
    lines = [
        "desctune serve: ready",
        f"  Prefect UI    {plan.prefect_url}   (database: {prefect_db})",
        f"  MLflow UI     {plan.mlflow_url}   (backend: {hide_password(plan.mlflow_backend)}, "
        f"artifacts: {plan.mlflow_artifacts})",
        login,
        f"  worker        on work pool {_pool()}",
        f"  deployments   {', '.join(deployed) or 'none'}",
        *(f"  {line}" for line in paused),
        f"  logs          {plan.artifacts / 'serve-logs'}",
        "From another shell:",
        f"  export PREFECT_API_URL={plan.api_url} MLFLOW_TRACKING_URI={plan.mlflow_url}",
        *export_auth,
        "  .venv/bin/prefect deployment run finetune/finetune --param config='{\"train\": {\"epochs\": 1}}'",
        "Ctrl-C stops all of them.",
    ]
    return "\n".join(lines)


def already_running(state: Path) -> str:
    try:
        info = json.loads(state.read_text())
        return (f"serve is already running for {state.parent} (pid {info['pid']}): Prefect "
                f"{info['prefect_url']}, MLflow {info['mlflow_url']}; stop it with Ctrl-C there or `kill {info['pid']}`")
    except (OSError, ValueError, KeyError):
        return f"serve is already running for {state.parent} (lock {state.with_suffix('.lock')} is held)"


def serve(plan: ServePlan, env: dict, timeout: float) -> int:
    """Start everything, deploy, print the URLs, then wait for Ctrl-C or a child's exit."""
    from filelock import FileLock, Timeout

    from deployments.deploy import DeployError, deploy, deploy_env, heartbeat_timing, paused_lines

    try:
        heartbeat_timing(env)
    except DeployError as exc:
        raise ServeError(str(exc)) from None
    plan.artifacts.mkdir(parents=True, exist_ok=True)
    state = plan.artifacts / "serve.json"
    lock = FileLock(str(plan.artifacts / "serve.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ServeError(already_running(state)) from None
    procs = Processes(plan.artifacts / "serve-logs")
    try:
        with stopped_on_signal(procs, "desctune serve: stopping the worker, MLflow and Prefect ..."):
            for port, flag in ((plan.prefect_port, "--prefect-port"), (plan.mlflow_port, "--mlflow-port")):
                if port_in_use(plan.host, port):
                    raise ServeError(f"port {port} on {plan.host} is already in use by another program; pick another "
                                     f"with {flag}")
            state.write_text(json.dumps({"pid": os.getpid(), "prefect_url": plan.prefect_url,
                                         "mlflow_url": plan.mlflow_url}))
            cmds = commands(plan, env)
            for name in ("prefect-server", "mlflow-server"):
                procs.start(name, *cmds[name])
            wait_until(lambda: http_ok(f"{plan.api_url}/health"), f"Prefect server at {plan.prefect_url}", procs,
                       timeout)
            wait_until(lambda: ui_api_url(plan.prefect_url, plan.creds) is not None,
                       f"Prefect UI at {plan.prefect_url}", procs, timeout)
            check_ui_settings(plan, env)
            wait_until(lambda: http_ok(f"{plan.mlflow_url}/health"), f"MLflow server at {plan.mlflow_url}", procs,
                       timeout)
            check_mlflow_login(plan)
            try:
                deployed = deploy(deploy_env(cmds["worker"][1], ROOT, plan.artifacts, plan.mlflow_url))
            except DeployError as exc:
                raise ServeError(str(exc)) from None
            mark_crashed_runs(plan, cmds["worker"][1])
            procs.start("worker", *cmds["worker"])
            wait_until(lambda: pool_ready(plan.api_url, plan.creds), f"worker on pool {_pool()}", procs, timeout)
            print(banner(plan, deployed.names, paused_lines(deployed)), flush=True)
            while True:
                procs.revive("worker", *cmds["worker"], min_uptime=WORKER_MIN_UPTIME)
                procs.check()
                time.sleep(1)
    finally:
        state.unlink(missing_ok=True)
        lock.release()
    return 0


def mark_crashed_runs(plan: ServePlan, client: dict) -> None:
    """Mark FAILED the MLflow runs that crashed flow runs left RUNNING (`tasks.crashed`), logged in as the worker is
    (`client`: its environment); a failure here is one warning line, never a reason not to serve."""
    from desctune.tracking import logged_in
    from tasks.crashed import fail_crashed_runs

    try:
        with logged_in(client):
            failed = fail_crashed_runs(plan.mlflow_url, plan.api_url,
                                       auth_string=client.get("PREFECT_API_AUTH_STRING"))
    except Exception as exc:  # noqa: BLE001 - the servers work without it
        failed = []
        print(f"desctune serve: could not check for crashed MLflow runs ({str(exc).splitlines()[0][:200]})",
              file=sys.stderr, flush=True)
    for run_id, why in failed:
        print(f"desctune serve: marked MLflow run {run_id} FAILED: {why}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stopped_on_signal(procs: Processes, stopping: str) -> Iterator[None]:
    """The block runs until Ctrl-C or SIGTERM (SIGINT too: a shell that starts a background job makes it ignore
    SIGINT, and Python keeps that), which print `stopping` and end it quietly; whatever ends it, every process in
    `procs` stops, with both signals ignored meanwhile, and the earlier handlers come back."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        print(stopping, file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    from desctune.store import is_url

    if is_url(args.artifacts_dir):
        raise ServeError(f"--artifacts-dir {args.artifacts_dir}: serve keeps its logs, lock and stage cache in a local "
                         "folder; for an object store, run `desctune run --set artifacts_dir=URL` on each worker")
    for port, flag in ((args.prefect_port, "--prefect-port"), (args.mlflow_port, "--mlflow-port")):
        if not 1 <= port <= 65535:
            raise ServeError(f"{flag} {port}: a port is a number from 1 to 65535")
    plan = make_plan(args.host, args.prefect_port, args.mlflow_port, args.artifacts_dir, dict(os.environ))
    return serve(plan, dict(os.environ), args.timeout)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="Prefect server + worker + MLflow server, deployed; Ctrl-C stops them")
    p.add_argument("--host", default="127.0.0.1", help="interface both servers bind (default: 127.0.0.1)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--artifacts-dir", default="artifacts",
                   help="MLflow store, stage cache, logs and the serve lock live here (default: artifacts)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for each server to be ready")
    p.set_defaults(func=cmd_serve)
