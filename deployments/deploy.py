"""Create a work pool (`desctune-local`, process, by default; `--pool-type docker|kubernetes` for the container
pools), deploy prefect.yaml's deployments on it to a running Prefect server and create (or rewrite) the automation
that marks their runs Crashed when heartbeats stop (deployments/crashed_runs.py).

`desctune serve` calls `deploy`; against a server of your own run `python -m deployments.deploy` with
PREFECT_API_URL and MLFLOW_TRACKING_URI set. Deployments whose entrypoint file is missing are skipped with a note,
so one flow still in the making never blocks the others.

Each pool's job template (deployments/<type>-job-template.json) pins what its flow runs execute and with which
environment; its `{{ $VAR }}` placeholders are filled here from the environment when the pool is created (`ENV_DEFAULTS`
says which have defaults, `OPTIONAL` which may be left unset). The container pools run the image built from
docker/Dockerfile or docker/Dockerfile.cuda, whose flow code is at /opt/desctune.
"""

from __future__ import annotations

import argparse
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
from deployments.schedules import CheckFailed, blockers
from desctune.store import is_url

ROOT = Path(__file__).resolve().parents[1]
POOL = "desctune-local"
TEMPLATE = Path(__file__).with_name("process-job-template.json")
# Work pool type -> (pool name, base job template); prefect.yaml's deployments are on "{{ $DESCTUNE_WORK_POOL }}".
POOLS = {
    "process": (POOL, TEMPLATE),
    "docker": ("desctune-docker", Path(__file__).with_name("docker-job-template.json")),
    "kubernetes": ("desctune-kubernetes", Path(__file__).with_name("kubernetes-job-template.json")),
}
IMAGE_DIR = "/opt/desctune"  # where docker/Dockerfile* put the flow code: the container pools' pull step goes there
# Container-pool settings with a default; the others the templates name must be set (or be OPTIONAL).
ENV_DEFAULTS = {
    "DESCTUNE_K8S_NAMESPACE": "desctune",
    "DESCTUNE_K8S_SERVICE_ACCOUNT": "default",
    "DESCTUNE_K8S_SECRET": "desctune-object-store",
    "DESCTUNE_AWS_CREDENTIALS_FILE": str(Path("~/.aws/credentials").expanduser()),
}
# Left out of the job (the env entry, the dict key) when unset: not every object store needs an endpoint URL, and
# the Docker worker picks the network itself when none is named.
# DESCTUNE_RESULTS_BLOCK is set by `on_shared_store` when the artifacts are on an object store.
OPTIONAL = {"AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "DESCTUNE_DOCKER_NETWORK", "DESCTUNE_RESULTS_BLOCK"}
# DESCTUNE_DOCKER_GPUS: "all" gives a Docker pool's containers every GPU of the worker's machine (NVIDIA Container
# Toolkit needed); "none" (the default) gives them none.
DOCKER_GPUS = "DESCTUNE_DOCKER_GPUS"


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


def deploy_env(base: dict, project: Path | str, artifacts: Path | str, mlflow_uri: str,
               pool_type: str = "process") -> dict:
    """The environment prefect.yaml's and the job template's `{{ $VAR }}` placeholders are filled from.

    For a container pool the flow runs start in the image's copy of the code (IMAGE_DIR), whatever `project` is."""
    if pool_type not in POOLS:
        raise DeployError(f"unknown pool type {pool_type!r} (one of: {', '.join(POOLS)})")
    env = {
        **base,
        "DESCTUNE_PROJECT_DIR": str(project) if pool_type == "process" else IMAGE_DIR,
        "DESCTUNE_ARTIFACTS_DIR": str(artifacts),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "DESCTUNE_WORK_POOL": POOLS[pool_type][0],
    }
    if pool_type != "process":
        env = {**ENV_DEFAULTS, **{k: v for k, v in env.items() if v}}
    return env


PLACEHOLDER = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


def job_template(env: dict, pool_type: str = "process") -> dict:
    """The pool's base job template with this machine's values filled into its `{{ $VAR }}` placeholders.

    The template pins the flow-run command (the worker's own), the environment and the working directory (for the
    container pools also the image, the namespace, service account and Secret, or the credentials file): a
    deployment or a flow run can set only the few variables the template declares, and Prefect refuses any other job
    variable (`additionalProperties: false`), so nobody who can trigger a run can choose what the worker executes."""
    if pool_type not in POOLS:
        raise DeployError(f"unknown pool type {pool_type!r} (one of: {', '.join(POOLS)})")
    template = json.loads(POOLS[pool_type][1].read_text())
    gone = object()

    def fill(value):
        if isinstance(value, dict):
            filled = {k: fill(v) for k, v in value.items()}
            return {k: v for k, v in filled.items() if v is not gone}
        if isinstance(value, list):
            return [v for v in map(fill, value) if v is not gone]
        if isinstance(value, str):
            whole = PLACEHOLDER.fullmatch(value.strip())
            if whole and whole[1] in OPTIONAL and not env.get(whole[1]):
                return gone

            def var(m: re.Match) -> str:
                if not env.get(m[1]):
                    raise DeployError(f"the {pool_type} job template needs {m[1]} set")
                return env[m[1]]
            return PLACEHOLDER.sub(var, value)
        return value

    template["job_configuration"] = fill(template["job_configuration"])
    if pool_type == "docker":
        gpus = env.get(DOCKER_GPUS, "none").strip().lower()
        if gpus not in ("all", "none"):
            raise DeployError(f"{DOCKER_GPUS} must be all or none, not {env[DOCKER_GPUS]!r}")
        if gpus == "none":
            template["job_configuration"]["container_create_kwargs"].pop("device_requests")
    if pool_type == "kubernetes":
        uri = env.get("MLFLOW_TRACKING_URI", "")
        if re.match(r"^\w+://(localhost|127\.|\[::1\])", uri) or uri.startswith(("file:", "sqlite:", "/")):
            raise DeployError(f"MLFLOW_TRACKING_URI {uri} is not reachable from a pod: name the MLflow server's "
                              "address in the cluster (e.g. http://mlflow.desctune.svc:5000)")
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


def on_shared_store(spec: dict, env: dict) -> tuple[dict, dict]:
    """A container pool's runs keep nothing in their container: every deployment's config names the shared
    DESCTUNE_ARTIFACTS_DIR, and on an object store Prefect's stage cache goes to its prefect-results/ through the
    block `tasks.stage.result_storage` saves, which the job environment names (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK),
    so a pod finds what the runs before it computed."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from tasks.stage import result_storage

    artifacts = env["DESCTUNE_ARTIFACTS_DIR"]
    spec = json.loads(json.dumps(spec))
    for d in spec.get("deployments", []):
        config = (d.get("parameters") or {}).get("config")
        if isinstance(config, dict):
            config["artifacts_dir"] = artifacts
    if is_url(artifacts):
        try:
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING")}):
                env = {**env, "DESCTUNE_RESULTS_BLOCK": result_storage(artifacts)}
        except Exception as exc:  # noqa: BLE001 - the server's or the network's error, as one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DeployError(f"saving the results block on {env['PREFECT_API_URL']} failed: {first}") from None
    return spec, env


@dataclass
class Deployed:
    """What `deploy` did: the deployments, and the ones whose schedules it left paused with the reason."""

    names: list[str]
    paused: dict[str, str] = field(default_factory=dict)


# The tag a deployment whose schedules were deployed paused carries (short, so the deployments list shows it beside
# the others); its description then says why.
PAUSED_TAG = "paused"


def say_paused(deployment: dict, why: str) -> None:
    """Put the reason where the Prefect UI shows it: a tag in the deployments list and a paragraph of the
    description. Both come from prefect.yaml again at the next deploy, which replaces them on the server, so once the
    reason is gone neither says paused."""
    deployment["tags"] = [*(deployment.get("tags") or []), PAUSED_TAG]
    deployment["description"] = (
        f"{deployment.get('description') or ''}\n\n**Schedule paused**: {why}. Once that is fixed, deploying "
        "again (restart `desctune serve`, or `python -m deployments.deploy`) checks again and deploys it active."
    ).lstrip()


def pause_unrunnable(spec: dict, names: list[str], root: Path, env: dict) -> tuple[dict, dict[str, str]]:
    """prefect.yaml with the schedules of deployments that could only fail here (`deployments.schedules.blockers`)
    set inactive and the reason in their description and tags (`say_paused`), and why each one is paused."""
    spec = json.loads(json.dumps(spec))
    paused = {}
    for d in spec.get("deployments", []):
        if d["name"] not in names or not any(s.get("active", True) for s in d.get("schedules") or []):
            continue
        try:
            reasons = blockers(d, root, env)
        except CheckFailed as exc:
            raise DeployError(f"checking whether {d['name']}'s schedule can run: {exc}") from None
        if reasons:
            for schedule in d["schedules"]:
                schedule["active"] = False
            paused[d["name"]] = "; ".join(reasons)
            say_paused(d, paused[d["name"]])
    return spec, paused


def deploy(env: dict, root: Path = ROOT, pool_type: str = "process") -> Deployed:
    """Create (or update) the work pool, deploy every deployable entry with the flow-run heartbeat in its
    environment, then upsert the crashed-runs automation. On the process pool, a schedule whose runs could only fail
    on this machine (no CUDA, no model, no data, nothing registered to evaluate) is deployed paused, with the
    reason; a container pool's runs happen elsewhere, so its schedules are deployed as prefect.yaml says."""
    heartbeat, window = heartbeat_timing(env)
    env = {**env, crashed_runs.HEARTBEAT_ENV: str(heartbeat), "DESCTUNE_WORK_POOL": POOLS[pool_type][0]}
    job_template(env, pool_type)  # a missing or unreachable setting is one line before anything is saved
    spec = load_spec(root)
    if pool_type != "process":
        spec, env = on_shared_store(spec, env)
    template_json = json.dumps(job_template(env, pool_type), indent=2)
    names, skipped = deployable(spec, root)
    for name in skipped:
        print(f"deploy: skipping {name!r}: its entrypoint file is not there yet", file=sys.stderr)
    spec, paused = pause_unrunnable(spec, names, root, env) if pool_type == "process" else (spec, {})
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / POOLS[pool_type][1].name
        template.write_text(template_json)
        _prefect(["work-pool", "create", POOLS[pool_type][0], "--type", pool_type, "--base-job-template",
                  str(template), "--overwrite"], env, root)
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


def paused_lines(deployed: Deployed) -> list[str]:
    """One line per paused schedule: which, why, and how to switch it on once the reason is gone. Deploying again
    (not `prefect deployment schedule resume`) also takes the reason out of the deployment's description and tags."""
    return [f"{name} schedule paused: {why} (once fixed: restart serve, or run python -m deployments.deploy, to "
            "check again and deploy it active)" for name, why in deployed.paused.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-type", choices=list(POOLS), default="process",
                        help="process: desctune-local on this machine (default); docker: desctune-docker; "
                             "kubernetes: desctune-kubernetes")
    pool_type = parser.parse_args(argv).pool_type
    if not os.environ.get("PREFECT_API_URL"):
        print("deploy: set PREFECT_API_URL to the Prefect server's API (e.g. http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    if pool_type == "process":
        artifacts = str(Path(os.environ.get("DESCTUNE_ARTIFACTS_DIR", ROOT / "artifacts")).resolve())
    elif not os.environ.get("DESCTUNE_ARTIFACTS_DIR"):
        print(f"deploy: set DESCTUNE_ARTIFACTS_DIR for the {pool_type} pool: its containers keep nothing, so the "
              "artifacts go to the shared object store (s3://BUCKET/PREFIX)", file=sys.stderr)
        return 2
    else:
        artifacts = os.environ["DESCTUNE_ARTIFACTS_DIR"]
    try:
        deployed = deploy(deploy_env(dict(os.environ), ROOT, artifacts, mlflow_uri, pool_type), ROOT, pool_type)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    print("deployed: " + ", ".join(deployed.names))
    for line in paused_lines(deployed):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
