"""Trial custom resources <-> the engine's Trial records.

The API is the source of truth: everything the engine needs to judge an
experiment (each trial's parameters, state, value, reported values) lives in
the Trial resources, so the operator and the suggestion service can be
restarted at any moment and rebuild what they hold from a list call.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from ..api import schema
from ..api.trial import Trial, TrialState

API_VERSION = schema.API_VERSION
EXPERIMENT_LABEL = f"{schema.GROUP}/experiment"
TRIAL_LABEL = f"{schema.GROUP}/trial"


def trial_name(experiment: str, number: int) -> str:
    """Deterministic, so a restarted operator re-creating a trial gets a conflict, not a duplicate."""
    return f"{experiment}-{number:04d}"


def pod_name(trial: str, attempt: int, resumes: int = 0) -> str:
    """A pod per run of a trial: its attempt (a lost pod's trial runs again from the start) and, for a
    paused trial resumed from its checkpoint, how many resumes came before (the attempt stays)."""
    name = trial if attempt <= 1 else f"{trial}-r{attempt}"
    return name if resumes <= 0 else f"{name}-resume{resumes}"


def current_pod(trial: Mapping[str, Any]) -> str:
    """The pod of the trial's current attempt. Its name follows from the attempt, so creating a pod needs
    no write to the trial; status.podName, once written (on start, on a retry), comes first."""
    status = trial.get("status") or {}
    return status.get("podName") or pod_name(trial["metadata"]["name"], int(trial["spec"].get("attempt", 1)))


def pod_of_attempt(trial: Mapping[str, Any]) -> bool:
    """Whether the trial's current pod is one of its current attempt's. Not so between the two writes of
    a retry (the new pod's name is written before the new attempt): no pod is made from such a copy."""
    base = pod_name(trial["metadata"]["name"], int(trial["spec"].get("attempt", 1)))
    pod = current_pod(trial)
    return pod == base or pod.startswith(base + "-resume")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    # fromisoformat, not strptime: every experiment pass parses every trial's times, and strptime is ~20x slower.
    return dt.datetime.fromisoformat(value).timestamp()


def trial_resource(experiment: Mapping[str, Any], number: int, params: dict, attempt: int = 1,
                   assignment: Mapping[str, Any] | None = None) -> dict:
    """assignment: the scheduler's for a new trial (HyperBand's bracket, the budget of its first run), kept
    in the spec from the start: its first pod needs the budget, and a rebuilt scheduler the bracket."""
    meta = experiment["metadata"]
    name = trial_name(meta["name"], number)
    return {
        "apiVersion": API_VERSION,
        "kind": "Trial",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {EXPERIMENT_LABEL: meta["name"], TRIAL_LABEL: name},
            "ownerReferences": [{
                "apiVersion": API_VERSION, "kind": "Experiment", "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": {"experiment": meta["name"], "number": number, "params": params, "attempt": attempt,
                 **({"assignment": dict(assignment)} if assignment else {})},
    }


def to_record(resource: Mapping[str, Any]) -> Trial:
    spec, status = resource["spec"], resource.get("status") or {}
    state = status.get("state") or TrialState.PENDING.value
    return Trial(
        number=int(spec["number"]),
        params=dict(status.get("params") or spec["params"]),
        state=TrialState(state),
        value=status.get("value"),
        intermediate=[list(p) for p in status.get("intermediate") or []],
        metrics=dict(status.get("metrics") or {}),
        reason=status.get("reason", ""),
        attempt=int(spec.get("attempt", 1)),
        started_at=parse_time(status.get("startTime")),
        finished_at=parse_time(status.get("completionTime")),
        name=resource["metadata"]["name"],
        events=_events(spec, status),
    )


def _events(spec: Mapping[str, Any], status: Mapping[str, Any]) -> list[dict]:
    """The scheduler's events for the trial, its assignment first (kept in the spec: see trial_resource)."""
    events = [dict(e) for e in status.get("events") or []]
    assignment = spec.get("assignment")
    if assignment and not any(e.get("event") == "assign" for e in events):
        events.insert(0, {"event": "assign", **assignment})
    return events


def owns(experiment: Mapping[str, Any], trial: Mapping[str, Any]) -> bool:
    """Whether the trial is this experiment's, not one's deleted earlier under the same name whose
    trials the garbage collector has not removed yet (kubectl delete returns before it does)."""
    uid = experiment["metadata"]["uid"]
    return any(o.get("uid") == uid for o in trial["metadata"].get("ownerReferences") or [])


def owned_by(resources: list[dict], experiment: Mapping[str, Any]) -> list[dict]:
    """The experiment's trials among those with its name: an earlier experiment's, taken as its
    own, would end it with their results before it ran a trial of its own."""
    return [r for r in resources if owns(experiment, r)]


def records(resources: list[Mapping[str, Any]]) -> list[Trial]:
    """Trial records in number order (numbers are contiguous unless a create is still in flight)."""
    return sorted((to_record(r) for r in resources), key=lambda t: t.number)
