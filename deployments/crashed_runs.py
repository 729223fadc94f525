"""Mark a desctune flow run Crashed when its heartbeats stop: the worker or machine running it died.

Prefect's open-source server has no zombie detection of its own. Flow runs of the deployments emit a
`prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (prefect.yaml sets it from
DESCTUNE_HEARTBEAT_SECONDS), and this automation (Prefect's documented "detect zombie flows" recipe) expects, after
each heartbeat, another one or a terminal state within the window; when neither comes it sets the run CRASHED with a
message that says what to do. It watches only flow runs tagged `desctune` (every deployment in prefect.yaml carries
the tag), so runs of other flows, whose heartbeats may be slower, are never touched.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

NAME = "desctune-crashed-runs"
TAG = "desctune"
HEARTBEAT_ENV = "DESCTUNE_HEARTBEAT_SECONDS"
WINDOW_ENV = "DESCTUNE_HEARTBEAT_WINDOW_SECONDS"
DEFAULT_HEARTBEAT = 30
MIN_HEARTBEAT = 30  # Prefect's own minimum for PREFECT_FLOWS_HEARTBEAT_FREQUENCY
TERMINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def timing(env: dict) -> tuple[int, int]:
    """(heartbeat seconds, window seconds) from the environment: defaults 30 and 3x the heartbeat.

    Raises ValueError with one line when a value is not a whole number of seconds or the window does not leave
    room for a late heartbeat."""
    heartbeat = _seconds(env, HEARTBEAT_ENV, DEFAULT_HEARTBEAT)
    if heartbeat < MIN_HEARTBEAT:
        raise ValueError(f"{HEARTBEAT_ENV}={heartbeat}: Prefect sends flow-run heartbeats at most every "
                         f"{MIN_HEARTBEAT} s; use {MIN_HEARTBEAT} or more")
    window = _seconds(env, WINDOW_ENV, 3 * heartbeat)
    if window <= heartbeat:
        raise ValueError(f"{WINDOW_ENV}={window} must be longer than the heartbeat ({heartbeat} s), or every "
                         f"healthy run would be marked Crashed; 3x the heartbeat ({3 * heartbeat}) is a safe value")
    return heartbeat, window


def _seconds(env: dict, name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number of seconds") from None


def message(window: int) -> str:
    return (f"No heartbeat for {window} s: the process running this flow run, its worker or its machine died. "
            "Trigger the same parameters again: finished stages come from the cache and training resumes from its "
            "newest checkpoint.")


def automation(window: int):
    """The automation spec: no heartbeat nor terminal state within `window` seconds of a heartbeat -> CRASHED."""
    from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    return AutomationCore(
        name=NAME,
        description=f"Marks a flow run tagged {TAG!r} Crashed when its heartbeats stop for {window} s "
                    "(desctune's deployments/crashed_runs.py; redeploying rewrites it).",
        enabled=True,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in TERMINAL)},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message(window))],
    )


def same_spec(automation, spec) -> bool:
    """Whether an automation read back through the client already is `spec`: every field of the spec alike (compared
    as Python values: the trigger's event names are sets, whose order in JSON varies)."""
    fields = set(type(spec).model_fields)
    return automation.model_dump(include=fields) == spec.model_dump(include=fields)


def upsert(api_url: str, spec, auth_string: str | None = None) -> UUID:
    """Create the automation, or rewrite the one of the same name where it differs (and drop duplicates); returns
    its id. One that already is the spec is left as it is: the server keeps what its trigger is waiting for per flow
    run under the trigger's id, and a rewrite gives the trigger a new id, so a run whose heartbeats had stopped before
    a redeploy would never be marked Crashed. `auth_string` is the API's `user:password` when it has one."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url, auth_string=auth_string) as client:
        existing = sorted(client.read_automations_by_name(spec.name), key=lambda a: str(a.id))
        if not existing:
            return client.create_automation(spec)
        keep, *extra = existing
        if not same_spec(keep, spec):
            client.update_automation(keep.id, spec)
        for duplicate in extra:
            client.delete_automation(duplicate.id)
        return keep.id
