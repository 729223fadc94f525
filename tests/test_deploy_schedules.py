"""Without servers: what serve tells the Prefect UI about its API, and which schedules it deploys paused and why."""

from __future__ import annotations

from conftest import ROOT, SAMPLE


def test_the_prefect_server_tells_its_ui_the_api_on_its_own_port():
    from app.serve_auth import prefect_server_env

    env = prefect_server_env({}, None, "127.0.0.1", 14200)
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:14200/api"
    assert env["PREFECT_UI_URL"] == "http://127.0.0.1:14200"
    kept = prefect_server_env({"PREFECT_UI_API_URL": "https://prefect.example/api"}, None, "127.0.0.1", 14200)
    assert kept["PREFECT_UI_API_URL"] == "https://prefect.example/api"


def test_schedules_that_can_only_fail_here_are_paused_with_their_reasons(tmp_path):
    from deployments.deploy import Deployed, load_spec, pause_unrunnable, paused_lines
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
    assert load_spec()["deployments"][1]["schedules"][0]["active"] is True  # prefect.yaml itself is left alone
    lines = paused_lines(Deployed(names, paused), spec)
    assert len(lines) == 2 and lines[0].startswith("retrain-weekly schedule paused: ")
    assert "prefect deployment schedule resume finetune/retrain-weekly --all" in lines[0]


def test_a_schedule_whose_model_data_and_device_are_there_stays_active(tmp_path):
    from deployments.schedules import blockers

    deployment = {"name": "nightly", "entrypoint": "flows/finetune.py:finetune",
                  "parameters": {"config": {"data": {"path": str(SAMPLE)}, "model": {"device": "cpu"}}},
                  "schedules": [{"cron": "0 1 * * *", "active": True}]}
    assert blockers(deployment, ROOT, {}) == []
    deployment["parameters"]["config"]["model"]["name"] = str(tmp_path / "nowhere")
    assert blockers(deployment, ROOT, {}) == [f"model {tmp_path / 'nowhere'} is not a folder here"]
