"""The crashed-runs automation spec and its heartbeat settings, without a server (tests/test_servers.py runs it)."""

import json
from datetime import timedelta

import pytest

from deployments import crashed_runs
from deployments.deploy import DeployError, heartbeat_timing, load_spec

TERMINAL = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}


def test_the_spec_is_prefects_zombie_recipe_for_desctune_runs_and_the_server_accepts_it():
    from prefect.server.events.schemas.automations import AutomationCore as ServerAutomation

    spec = crashed_runs.automation(45)
    t = spec.trigger
    assert spec.name == "desctune-crashed-runs" and spec.enabled
    assert t.posture == "Proactive" and t.threshold == 1 and t.within == timedelta(seconds=45)
    assert t.after == {"prefect.flow-run.heartbeat"}
    assert t.expect == {"prefect.flow-run.heartbeat"} | TERMINAL
    assert t.for_each == {"prefect.resource.id"}
    assert dict(t.match.root) == {"prefect.resource.id": "prefect.flow-run.*"}
    assert dict(t.match_related.root) == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.desctune"}
    [action] = spec.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED" and not action.force
    assert action.message.startswith("No heartbeat for 45 s:")
    assert "resumes from its newest checkpoint" in action.message
    server_side = ServerAutomation.model_validate(spec.model_dump(mode="json"))
    assert server_side.trigger.within == timedelta(seconds=45)


def test_heartbeat_defaults_overrides_and_bad_values_in_one_line():
    assert crashed_runs.timing({}) == (30, 90)
    assert crashed_runs.timing({"DESCTUNE_HEARTBEAT_SECONDS": "60"}) == (60, 180)
    assert crashed_runs.timing({"DESCTUNE_HEARTBEAT_WINDOW_SECONDS": "45"}) == (30, 45)
    for env, says in (
        ({"DESCTUNE_HEARTBEAT_SECONDS": "10"}, "use 30 or more"),
        ({"DESCTUNE_HEARTBEAT_SECONDS": "half a minute"}, "is not a whole number of seconds"),
        ({"DESCTUNE_HEARTBEAT_WINDOW_SECONDS": "30"}, "must be longer than the heartbeat (30 s)"),
    ):
        with pytest.raises(DeployError) as err:
            heartbeat_timing(env)
        assert says in str(err.value) and "\n" not in str(err.value)


def test_every_deployment_sends_heartbeats_and_carries_the_watched_tag():
    """The heartbeat is in the pool's job template (which a deployment cannot override), every deployment on it."""
    from deployments.deploy import POOL, TEMPLATE

    env = json.loads(TEMPLATE.read_text())["job_configuration"]["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "{{ $DESCTUNE_HEARTBEAT_SECONDS }}"
    spec = load_spec()
    for d in spec["deployments"]:
        assert crashed_runs.TAG in d["tags"], d["name"]
        assert d["work_pool"]["name"] == POOL and "job_variables" not in d["work_pool"], d["name"]
