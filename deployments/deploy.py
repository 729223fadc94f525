"""Create the `desctune-local` process work pool, deploy prefect.yaml's deployments to a running Prefect server and
create (or rewrite) the automation that marks their runs Crashed when heartbeats stop (deployments/crashed_runs.py).

`desctune serve` calls `deploy`; against a server of your own run `python -m deployments.deploy` with
PREFECT_API_URL and MLFLOW_TRACKING_URI set. Deployments whose entrypoint file is missing are skipped with a note,
so one flow still in the making never blocks the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deployments import crashed_runs
from deployments.schedules import blockers

ROOT = Path(__file__).resolve().parents[1]
POOL = "desctune-local"
TEMPLATE = Path(__file__).with_name("process-job-template.json")


class DeployError(Exception):
    """Deploying failed for a reason the user can act on; the message is one line."""


def load_spec(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "prefect.yaml").read_text())


def deployable(spec: dict, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """Names of deployments whose entrypoint file exists, and of those skipped because it does not."""
    ready, skipped = [], []
    for d in spec.get("deployments", []):
        path = d["entrypoint"].split(":", 1)[0]
        (ready if (root / path).is_file() else skipped).append(d["name"])
    return ready, skipped


def deploy_env(base: dict, project: Path, artifacts: Path, mlflow_uri: str) -> dict:
    """The environment prefect.yaml's `{{ $VAR }}` placeholders are filled from."""
    return {
        **base,
        "DESCTUNE_PROJECT_DIR": str(project),
        "DESCTUNE_ARTIFACTS_DIR": str(artifacts),
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }


def job_template(env: dict) -> dict:
    """The pool's base job template with this machine's values filled into its `{{ $VAR }}` placeholders.

    The template pins the flow-run command (the worker's own), the environment and the working directory: a
    deployment or a flow run can set only `name`, `labels` and `stream_output`, and Prefect refuses any other job
    variable (`additionalProperties: false`), so nobody who can trigger a run can choose what the worker executes."""
    template = json.loads(TEMPLATE.read_text())

    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, str):
            def var(m: re.Match) -> str:
                if not env.get(m[1]):
                    raise DeployError(f"the job template needs {m[1]} set")
                return env[m[1]]
            return re.sub(r"\{\{\s*\$(\w+)\s*\}\}", var, value)
        return value

    template["job_configuration"] = fill(template["job_configuration"])
    return template


def _prefect(args: list[str], env: dict, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        raise DeployError(f"prefect {args[0]} {args[1] if len(args) > 1 else ''} failed: {lines[-1] if lines else done.returncode}")


def heartbeat_timing(env: dict) -> tuple[int, int]:
    """Flow-run heartbeat and crash-detection window in seconds, or a DeployError naming the bad setting."""
    try:
        return crashed_runs.timing(env)
    except ValueError as exc:
        raise DeployError(str(exc)) from None


@dataclass
class Deployed:
    """What `deploy` did: the deployments, and the ones whose schedules it left paused with the reason."""

    names: list[str]
    paused: dict[str, str] = field(default_factory=dict)


def pause_unrunnable(spec: dict, names: list[str], root: Path, env: dict) -> tuple[dict, dict[str, str]]:
    """prefect.yaml with the schedules of deployments that could only fail here (`deployments.schedules.blockers`)
    set inactive, and why each one is paused."""
    spec = json.loads(json.dumps(spec))
    paused = {}
    for d in spec.get("deployments", []):
        if d["name"] not in names or not any(s.get("active", True) for s in d.get("schedules") or []):
            continue
        reasons = blockers(d, root, env)
        if reasons:
            for schedule in d["schedules"]:
                schedule["active"] = False
            paused[d["name"]] = "; ".join(reasons)
    return spec, paused


def deploy(env: dict, root: Path = ROOT) -> Deployed:
    """Create (or update) the work pool, deploy every deployable entry with the flow-run heartbeat in its
    environment, then upsert the crashed-runs automation. A schedule whose runs could only fail on this machine
    (no CUDA, no model, no data, nothing registered to evaluate) is deployed paused, with the reason."""
    heartbeat, window = heartbeat_timing(env)
    env = {**env, crashed_runs.HEARTBEAT_ENV: str(heartbeat)}
    spec = load_spec(root)
    names, skipped = deployable(spec, root)
    for name in skipped:
        print(f"deploy: skipping {name!r}: its entrypoint file is not there yet", file=sys.stderr)
    spec, paused = pause_unrunnable(spec, names, root, env)
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / TEMPLATE.name
        template.write_text(json.dumps(job_template(env), indent=2))
        _prefect(["work-pool", "create", POOL, "--type", "process", "--base-job-template", str(template),
                  "--overwrite"], env, root)
        if names:
            prefect_file = Path(tmp) / "prefect.yaml"
            prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
            _prefect(["deploy", "--prefect-file", str(prefect_file), *(a for n in names for a in ("--name", n))],
                     env, root)
    try:
        crashed_runs.upsert(env["PREFECT_API_URL"], crashed_runs.automation(window), env.get("PREFECT_API_AUTH_STRING"))
    except Exception as exc:
        raise DeployError(f"creating the automation {crashed_runs.NAME!r} failed: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return Deployed(names, paused)


def paused_lines(deployed: Deployed, spec: dict | None = None) -> list[str]:
    """One line per paused schedule: which, why, and how to switch it on once the reason is gone."""
    flows = {d["name"]: d["entrypoint"].rsplit(":", 1)[1].replace("_", "-") for d in (spec or load_spec())["deployments"]}
    return [f"{name} schedule paused: {why} (once fixed: prefect deployment schedule resume "
            f"{flows.get(name, '?')}/{name} --all, or restart serve)" for name, why in deployed.paused.items()]


def main() -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("deploy: set PREFECT_API_URL to the Prefect server's API (e.g. http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    artifacts = Path(os.environ.get("DESCTUNE_ARTIFACTS_DIR", ROOT / "artifacts")).resolve()
    try:
        deployed = deploy(deploy_env(dict(os.environ), ROOT, artifacts, mlflow_uri))
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    print("deployed: " + ", ".join(deployed.names))
    for line in paused_lines(deployed):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
