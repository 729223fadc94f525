"""What serve tells the Prefect UI about its API, and which schedules it deploys paused and why: without servers,
and on a real Prefect server, where the reason is in the deployment's description and tags until a deploy finds it
gone."""

from __future__ import annotations

import asyncio

from conftest import ROOT, SAMPLE


def test_the_prefect_server_tells_its_ui_the_api_on_its_own_port():
    from app.serve_auth import prefect_server_env

    env = prefect_server_env({}, None, "127.0.0.1", 14200)
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:14200/api"
    assert env["PREFECT_UI_URL"] == "http://127.0.0.1:14200"
    kept = prefect_server_env({"PREFECT_UI_API_URL": "https://prefect.example/api"}, None, "127.0.0.1", 14200)
    assert kept["PREFECT_UI_API_URL"] == "https://prefect.example/api"


def test_schedules_that_can_only_fail_here_are_paused_with_their_reasons(tmp_path):
    from deployments.deploy import PAUSED_TAG, Deployed, load_spec, pause_unrunnable, paused_lines
    from deployments.schedules import cuda_available

    spec = load_spec()
    names = [d["name"] for d in spec["deployments"]]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    paused_spec, paused = pause_unrunnable(spec, names, ROOT, env)
    by_name = {d["name"]: d for d in paused_spec["deployments"]}
    assert "data/trn.json is not there" in paused["retrain-weekly"]
    if not cuda_available():
        assert "needs CUDA" in paused["retrain-weekly"]
    assert paused["evaluate-champion"].startswith("no desctune-smollm2@champion in the registry yet")
    assert [s["active"] for s in by_name["retrain-weekly"]["schedules"]] == [False]
    assert "finetune" not in paused and not by_name["finetune"].get("schedules")
    for name in ("retrain-weekly", "evaluate-champion"):  # the UI shows the reason, not only serve's console
        assert by_name[name]["tags"][-1] == PAUSED_TAG
        assert f"**Schedule paused**: {paused[name]}. " in by_name[name]["description"]
    unpaused = {d["name"]: d for d in spec["deployments"]}
    assert by_name["finetune"] == unpaused["finetune"] and by_name["finetune-smoke"] == unpaused["finetune-smoke"]
    assert by_name["retrain-weekly"]["description"].startswith(unpaused["retrain-weekly"]["description"] + "\n\n")
    assert unpaused["retrain-weekly"]["schedules"][0]["active"] is True  # prefect.yaml itself is left alone
    assert PAUSED_TAG not in unpaused["retrain-weekly"]["tags"]
    lines = paused_lines(Deployed(names, paused))
    assert len(lines) == 2 and lines[0].startswith("retrain-weekly schedule paused: ")
    assert lines[0].endswith("(once fixed: restart serve, or run python -m deployments.deploy, to check again and "
                             "deploy it active)")


def test_a_schedule_whose_model_data_and_device_are_there_stays_active(tmp_path):
    from deployments.schedules import blockers

    deployment = {"name": "nightly", "entrypoint": "flows/finetune.py:finetune",
                  "parameters": {"config": {"data": {"path": str(SAMPLE)}, "model": {"device": "cpu"}}},
                  "schedules": [{"cron": "0 1 * * *", "active": True}]}
    assert blockers(deployment, ROOT, {}) == []
    deployment["parameters"]["config"]["model"]["name"] = str(tmp_path / "nowhere")
    assert blockers(deployment, ROOT, {}) == [f"model {tmp_path / 'nowhere'} is not a folder here"]


async def read_deployments(api_url: str, names: list[str]) -> dict:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return {name: await client.read_deployment_by_name(name) for name in names}


def test_a_paused_schedules_reason_is_in_its_description_and_tags_until_a_deploy_finds_it_gone(
        prefect_server, tmp_path):
    """Deploying replaces a deployment's description and tags on the server (it does not merge them): the first
    deploy, before there is a champion, says why evaluate-champion is paused; the next, with a champion registered,
    deploys it active and says nothing of a pause, while retrain-weekly (no data/trn.json here) still does."""
    from mlflow.tracking import MlflowClient

    from deployments.deploy import PAUSED_TAG, deploy, deploy_env, load_spec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = deploy_env(prefect_server, ROOT, tmp_path / "artifacts", uri)
    names = ["evaluate-champion/evaluate-champion", "finetune/retrain-weekly"]
    yaml_says = {d["name"]: d for d in load_spec()["deployments"]}

    first = deploy(env, ROOT)
    assert set(first.paused) >= {"evaluate-champion", "retrain-weekly"}
    before = asyncio.run(read_deployments(env["PREFECT_API_URL"], names))
    evaluate = before["evaluate-champion/evaluate-champion"]
    assert PAUSED_TAG in evaluate.tags and not any(s.active for s in evaluate.schedules)
    assert f"**Schedule paused**: {first.paused['evaluate-champion']}" in evaluate.description

    mlflow = MlflowClient(uri, registry_uri=uri)
    mlflow.create_registered_model("desctune-smollm2")
    version = mlflow.create_model_version("desctune-smollm2", str(tmp_path / "adapter"))
    mlflow.set_registered_model_alias("desctune-smollm2", "champion", version.version)

    second = deploy(env, ROOT)
    assert "evaluate-champion" not in second.paused and "retrain-weekly" in second.paused
    after = asyncio.run(read_deployments(env["PREFECT_API_URL"], names))
    evaluate = after["evaluate-champion/evaluate-champion"]
    assert [s.active for s in evaluate.schedules] == [True]
    assert evaluate.id == before["evaluate-champion/evaluate-champion"].id
    assert sorted(evaluate.tags) == sorted(yaml_says["evaluate-champion"]["tags"])
    assert evaluate.description == yaml_says["evaluate-champion"]["description"]
    retrain = after["finetune/retrain-weekly"]
    assert PAUSED_TAG in retrain.tags and "**Schedule paused**" in retrain.description
