"""Who may use what `desctune serve` starts: its credentials, the environment each process gets, and the refusal to
listen beyond this machine without them.

One user and password protect both servers: Prefect's API (`PREFECT_SERVER_API_AUTH_STRING` = `user:password` on the
server, `PREFECT_API_AUTH_STRING` for its clients: the worker, its flow runs and the deploy steps) and MLflow's
basic-auth app (its admin user; clients get `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`). The password comes
from DESCTUNE_SERVE_PASSWORD or from the first line of the file DESCTUNE_SERVE_PASSWORD_FILE names; the user is
DESCTUNE_SERVE_USER (default `desctune`). On loopback both are optional; on any other address serve refuses to start
without them. Prefect's CSRF protection is on and both servers accept cross-origin requests only from the served
origins, with or without a password.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from desctune.errors import ServeError

USER_ENV, PASSWORD_ENV, PASSWORD_FILE_ENV = "DESCTUNE_SERVE_USER", "DESCTUNE_SERVE_PASSWORD", "DESCTUNE_SERVE_PASSWORD_FILE"
DEFAULT_USER = "desctune"
MIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter passwords

# Settings only a server needs: kept out of the worker, whose flow runs run code that the API's users choose.
PREFECT_SERVER_ONLY = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_API_AUTH_STRING")
MLFLOW_SERVER_ONLY = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_REGISTRY_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                      "MLFLOW_DEFAULT_ARTIFACT_ROOT", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME",
                      "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
DESCTUNE_SECRETS = (PASSWORD_ENV, PASSWORD_FILE_ENV)


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = ""

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(user={self.user!r}, password=***)"

    @property
    def auth_string(self) -> str:
        return f"{self.user}:{self.password}"

    @property
    def header(self) -> str:
        """The HTTP Authorization header both servers accept."""
        return "Basic " + base64.b64encode(self.auth_string.encode()).decode()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def credentials(env: dict) -> Credentials | None:
    """The configured user and password, None when no password is set; a ServeError names a bad setting."""
    password = env.get(PASSWORD_ENV) or None
    path = env.get(PASSWORD_FILE_ENV) or None
    if password and path:
        raise ServeError(f"set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}, not both")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ServeError(f"{PASSWORD_FILE_ENV}={path}: cannot read it ({exc.strerror})") from None
        password = lines[0].strip() if lines else ""
        if not password:
            raise ServeError(f"{PASSWORD_FILE_ENV}={path}: its first line is empty")
    if password is None:
        return None
    if not password.strip():
        raise ServeError(f"{PASSWORD_ENV} is only blanks: set a password of at least {MIN_PASSWORD} characters")
    if len(password) < MIN_PASSWORD:
        raise ServeError(f"the serve password must be at least {MIN_PASSWORD} characters long (MLflow's rule)")
    user = env.get(USER_ENV) or DEFAULT_USER
    if ":" in user or not user.isprintable() or user != user.strip():
        raise ServeError(f"{USER_ENV}={user!r}: a user name has no colon, no blank at either end")
    return Credentials(user, password)


def check_exposure(host: str, creds: Credentials | None) -> None:
    """Refuse to listen beyond this machine without credentials: Prefect's API runs commands as the worker."""
    if creds is None and not is_loopback(host):
        raise ServeError(
            f"--host {host} would let anyone who reaches it run commands through Prefect and change the MLflow "
            f"registry: set {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}), at least {MIN_PASSWORD} characters, and "
            f"optionally {USER_ENV}, or serve on 127.0.0.1")


def served_hosts(host: str) -> list[str]:
    """The names browsers may use to reach a server bound to `host`."""
    if is_loopback(host):
        names = [host, "127.0.0.1", "localhost"]
    elif host in ("0.0.0.0", "::", "[::]"):
        names = [socket.gethostname(), socket.getfqdn(), "127.0.0.1", "localhost"]
    else:
        names = [host]
    return list(dict.fromkeys(f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names))


def origins(host: str, port: int) -> str:
    """Comma-separated origins of a server bound to host:port, for its CORS setting."""
    return ",".join(f"http://{name}:{port}" for name in served_hosts(host))


def without(env: dict, names) -> dict:
    return {k: v for k, v in env.items() if k not in names}


def browser_url(host: str, port: int) -> str:
    """The address a browser uses for a server bound to host:port (this machine's name for a wildcard bind)."""
    return f"http://{served_hosts(host)[0]}:{port}"


def prefect_server_env(env: dict, creds: Credentials | None, host: str, port: int) -> dict:
    """The Prefect server's environment. Its UI asks `/ui-settings` where the API is; without PREFECT_UI_API_URL the
    server answers its default port (4200) whatever `--port` it was started on, and every page of a server on
    another port says it cannot connect, so both UI URLs name the served port unless the user set them."""
    out = without(env, ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", *MLFLOW_SERVER_ONLY, *DESCTUNE_SECRETS))
    out["PREFECT_UI_URL"] = env.get("PREFECT_UI_URL") or browser_url(host, port)
    out["PREFECT_UI_API_URL"] = env.get("PREFECT_UI_API_URL") or f"{browser_url(host, port)}/api"
    out["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] = "true"
    out["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] = env.get("PREFECT_SERVER_CORS_ALLOWED_ORIGINS") or origins(host, port)
    if creds is not None:
        out["PREFECT_SERVER_API_AUTH_STRING"] = creds.auth_string
    else:
        out.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    return out


def mlflow_auth_config(path: Path, artifacts: Path) -> Path:
    """MLflow's basic-auth configuration: its user store under the artifacts folder, nobody but the admin allowed
    anything by default. The admin's name and password reach MLflow through its environment, never this file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{artifacts / 'mlflow-auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a checked password is remembered for 5 minutes instead of hashed again for every request (MLflow's default:
        # off); a password changed through MLflow's API leaves the cache at once
        "auth_cache_ttl_seconds = 300\n"
    )
    return path


def mlflow_server_env(env: dict, creds: Credentials | None, host: str, port: int, backend: str,
                      artifacts_destination: str, artifacts: Path) -> dict:
    """The MLflow server's environment: its stores (never on its command line, where `ps` shows them), its CORS
    origins and, with credentials, its basic-auth app's admin user."""
    out = without(env, ("PREFECT_API_URL", *PREFECT_SERVER_ONLY, "PREFECT_API_AUTH_STRING", *DESCTUNE_SECRETS,
                        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    out["MLFLOW_BACKEND_STORE_URI"] = backend
    out["MLFLOW_ARTIFACTS_DESTINATION"] = artifacts_destination
    out["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    out["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] = env.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS") or origins(host, port)
    if creds is not None:
        if not env.get("MLFLOW_AUTH_CONFIG_PATH"):
            out["MLFLOW_AUTH_CONFIG_PATH"] = str(mlflow_auth_config(artifacts / "serve-auth" / "basic_auth.ini",
                                                                    artifacts))
        out["MLFLOW_AUTH_ADMIN_USERNAME"] = creds.user
        out["MLFLOW_AUTH_ADMIN_PASSWORD"] = creds.password
        out["MLFLOW_FLASK_SERVER_SECRET_KEY"] = env.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32)
    return out


def client_env(env: dict, creds: Credentials | None, api_url: str, mlflow_url: str) -> dict:
    """What the worker, its flow runs and the deploy steps get: where the servers are and how to log in, none of
    the servers' own secrets (database URLs, the admin bootstrap, the serve password variables)."""
    out = without(env, (*PREFECT_SERVER_ONLY, *MLFLOW_SERVER_ONLY, *DESCTUNE_SECRETS, "PREFECT_API_AUTH_STRING",
                        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    out.update(PREFECT_API_URL=api_url, MLFLOW_TRACKING_URI=mlflow_url)
    if creds is not None:
        out.update(PREFECT_API_AUTH_STRING=creds.auth_string, MLFLOW_TRACKING_USERNAME=creds.user,
                   MLFLOW_TRACKING_PASSWORD=creds.password)
    return out


DEPLOYMENT_PATH = re.compile(r"/api/deployments/(?P<id>[0-9a-fA-F-]{36})")


class DeploymentJobVariablesCheck:
    """Around the Prefect server's app: a PATCH of a deployment's job variables is checked against its work pool's
    template, as Prefect checks a flow run's (422 for a variable the template does not declare, such as `command`).
    Prefect itself checks them only when the same PATCH names the work pool. Requests without the server's
    credentials pass untouched, to be refused by Prefect."""

    def __init__(self, app):
        self.app = app
        auth = os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
        self.header = ("Basic " + base64.b64encode(auth.encode()).decode()).encode() if auth else None

    async def __call__(self, scope, receive, send):
        match = DEPLOYMENT_PATH.fullmatch(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope["method"] != "PATCH" or (
                self.header is not None and dict(scope["headers"]).get(b"authorization") != self.header):
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        refusal = await self.refusal(match["id"], body)
        if refusal is not None:
            from starlette.responses import JSONResponse

            return await JSONResponse({"detail": refusal}, status_code=422)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def refusal(deployment_id: str, body: bytes) -> str | None:
        """Why Prefect's own check refuses the job variables in this PATCH body, or None."""
        from uuid import UUID

        from fastapi import HTTPException
        from prefect.server import models, schemas
        from prefect.server.api.validation import validate_job_variables_for_deployment
        from prefect.server.database import provide_database_interface

        try:
            job_variables = json.loads(body or b"{}").get("job_variables")
        except (ValueError, AttributeError):
            return None  # not a JSON object: Prefect answers it
        if not job_variables:
            return None
        db = provide_database_interface()
        async with db.session_context() as session:
            deployment = await models.deployments.read_deployment(session=session, deployment_id=UUID(deployment_id))
            pool = deployment.work_queue.work_pool if deployment and deployment.work_queue else None
            if pool is None:
                return None
            try:
                await validate_job_variables_for_deployment(
                    session, pool, schemas.actions.DeploymentUpdate(job_variables=job_variables))
            except HTTPException as exc:
                return str(exc.detail)
        return None


def start_prefect_server(argv: list[str]) -> None:
    """`prefect server start ARGV` (in the foreground, one process) with DeploymentJobVariablesCheck around its app."""
    import prefect.server.api.server as server
    from prefect.cli import app

    create_app = server.create_app
    server.create_app = lambda *args, **kwargs: DeploymentJobVariablesCheck(create_app(*args, **kwargs))
    sys.argv = ["prefect", "server", "start", *argv]
    app()


if __name__ == "__main__":
    start_prefect_server(sys.argv[1:])
