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


def test_a_redeploy_rewrites_the_automation_only_where_it_differs():
    """The automation as the client reads it back is the same spec, and one with another window is not;
    tests/test_servers.py checks that a real redeploy leaves the server's trigger (and its id) as it was."""
    from prefect.events.schemas.automations import Automation

    read_back = Automation.model_validate({**crashed_runs.automation(45).model_dump(mode="json"),
                                           "id": "00000000-0000-0000-0000-000000000001"})
    assert crashed_runs.same_spec(read_back, crashed_runs.automation(45))
    assert not crashed_runs.same_spec(read_back, crashed_runs.automation(90))


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
    from deployments.deploy import POOLS

    for _, template in POOLS.values():
        env = json.loads(template.read_text())["job_configuration"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "{{ $DESCTUNE_HEARTBEAT_SECONDS }}", template.name
    spec = load_spec()
    for d in spec["deployments"]:
        assert crashed_runs.TAG in d["tags"], d["name"]
        assert d["work_pool"]["name"] == "{{ $DESCTUNE_WORK_POOL }}", d["name"]
        assert set(d["work_pool"].get("job_variables", {})) <= {"gpus"}, d["name"]  # a GPU count, nothing to execute


# MLflow runs that crashed flow runs left RUNNING: told apart from runs still being written, and marked FAILED.

def test_a_run_is_judged_by_its_process_on_this_machine_else_by_its_flow_run():
    from desctune.registry.lineage import orphan_reason

    here = {"desctune.host": "box", "desctune.pid": "42", "desctune.process_start": "7", "prefect.flow_run_id": "f"}
    elsewhere = {**here, "desctune.host": "other-box"}

    def alive(pid, start):
        return True

    def dead(pid, start):
        return False

    assert orphan_reason(here, "CRASHED", "box", alive) is None  # still running here, whatever Prefect says
    assert orphan_reason(here, "RUNNING", "box", dead) == "its process (pid 42 on box) is gone"
    assert orphan_reason(here, None, "box", dead) == "its process (pid 42 on box) is gone"
    assert orphan_reason(elsewhere, "CRASHED", "box", dead) == "its flow run f ended CRASHED"
    assert orphan_reason(elsewhere, "COMPLETED", "box", alive) == "its flow run f ended COMPLETED"
    assert orphan_reason(elsewhere, "RUNNING", "box", dead) is None  # another machine's process: cannot tell
    assert orphan_reason(elsewhere, None, "box", dead) is None
    assert orphan_reason({"prefect.flow_run_id": "f"}, "CANCELLED", "box") == "its flow run f ended CANCELLED"


def test_a_dead_or_reused_pid_is_not_alive_and_a_live_process_is():
    import os
    import subprocess
    import sys

    from desctune.registry.lineage import process_alive, process_start

    assert process_alive(os.getpid(), process_start(os.getpid()))
    assert not process_alive(os.getpid(), "1")  # the same pid, but another process (started at another time)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid, None)


@pytest.fixture
def prefect_flow_runs():
    """Create real Prefect flow runs in a given state (the test session's Prefect API); returns a factory."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    @flow(name="crash-test")
    def crash_test():
        pass

    def make(state: str) -> str:
        with get_client(sync_client=True) as prefect:
            run = prefect.create_flow_run(crash_test, state=Running())
            if state == "CRASHED":
                prefect.set_flow_run_state(run.id, Crashed(message="no heartbeat"), force=True)
            return str(run.id)

    return make


def test_crashed_runs_are_marked_failed_and_runs_still_being_written_are_left_alone(tmp_path, prefect_flow_runs):
    import os
    import socket
    import subprocess
    import sys

    from desctune.registry.lineage import process_start
    from desctune.tracking import client
    from tasks.crashed import fail_crashed_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("desctune", (tmp_path / "mlruns").as_uri())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    try:
        def run(flow_state: str | None, host: str, pid: int | None) -> str:
            tags = {"prefect.flow_run_id": prefect_flow_runs(flow_state)} if flow_state else {}
            if pid is not None:
                tags |= {"desctune.host": host, "desctune.pid": str(pid),
                         "desctune.process_start": process_start(pid) or ""}
            return c.create_run(exp, tags=tags).info.run_id

        live_here_crashed_in_prefect = run("CRASHED", host, sleeper.pid)
        other_machine_crashed = run("CRASHED", "other-box", 1234)
        other_machine_running = run("RUNNING", "other-box", 1234)
        killed_here = run("RUNNING", host, gone.pid)
        this_process = run(None, host, os.getpid())
        finished = run("CRASHED", "other-box", 1234)
        c.set_terminated(finished, "FINISHED")

        failed = dict(fail_crashed_runs(uri))
        status = {r: c.get_run(r).info.status for r in (live_here_crashed_in_prefect, other_machine_crashed,
                                                         other_machine_running, killed_here, this_process, finished)}
        assert status == {live_here_crashed_in_prefect: "RUNNING", other_machine_crashed: "FAILED",
                          other_machine_running: "RUNNING", killed_here: "FAILED", this_process: "RUNNING",
                          finished: "FINISHED"}
        assert failed[killed_here] == f"its process (pid {gone.pid} on {host}) is gone"
        assert failed[other_machine_crashed].endswith("ended CRASHED")
        assert c.get_run(killed_here).data.tags["desctune.failed_because"] == failed[killed_here]
        assert fail_crashed_runs(uri) == []  # nothing left to mark
    finally:
        sleeper.kill()
        sleeper.wait()
