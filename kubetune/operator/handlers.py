"""The kopf handlers: Kubernetes events in, Controller calls out.

Each experiment gets a daemon that reconciles it until it is over, woken as
soon as one of its trials changes (or every second, for timeouts). Trials get
their pods on creation and on resume; pod changes are folded into the trials.
The Controller's calls block on the API, so they run in threads.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from ..api import schema
from .control import PAUSE_GRACE, STOP_GRACE, Controller
from .records import current_pod

G, V = schema.GROUP, schema.VERSION
TRIAL_POD = {"kubetune.io/trial": kopf.PRESENT}

controller: Controller | None = None  # set by kubetune.operator.main before kopf starts
_wake: dict[tuple[str, str], asyncio.Event] = {}


def _event(namespace: str, name: str) -> asyncio.Event:
    return _wake.setdefault((namespace, name), asyncio.Event())


def wake(namespace: str, experiment: str | None) -> None:
    if experiment:
        _event(namespace, experiment).set()


@kopf.index(G, V, "trials")
def trials_by_experiment(namespace, spec, body, **_):
    """The operator's cache of every Trial, by experiment: a reconcile never lists them from the API."""
    return {(namespace, spec.get("experiment")): dict(body)}


@kopf.index(G, V, "trials")
def trial_by_name(namespace, name, body, **_):
    return {(namespace, name): dict(body)}


def _not_ended(status, **_) -> bool:
    return not (status or {}).get("completionTime")


@kopf.daemon(G, V, "experiments", cancellation_timeout=5.0, initial_delay=0, when=_not_ended)
async def run_experiment(namespace, name, stopped, logger, trials_by_experiment: kopf.Index, **_):
    """Runs while the experiment has not ended. Once it has, it goes on looking until kopf stops it (the
    filter no longer matching), never returns: kopf never starts again a daemon that returned by itself, and
    an ended experiment whose budget is raised goes on (continue_if_raised). (Looking, not waiting: kopf may
    see only the latest of two events close together, and not the end of one continued moments later.)"""
    wakeup = _event(namespace, name)
    over = False
    while not stopped:
        wakeup.clear()
        trials = list(trials_by_experiment.get((namespace, name), []))
        try:
            ended = await asyncio.to_thread(controller.reconcile_experiment, namespace, name, trials)
            if ended and not over:
                logger.info("experiment %s is over", name)
            over = ended
        except Exception as e:  # noqa: BLE001 - the next pass may succeed (API or service restarting)
            logger.warning("reconcile failed, retrying: %s", e)
        try:
            await asyncio.wait_for(wakeup.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        # Let a burst of trial changes land first: a pass costs O(trials), and one pass fills every free slot.
        await asyncio.sleep(0.25)


@kopf.on.event(G, V, "experiments")
async def experiment_changed(event, body, namespace, name, logger, trials_by_experiment: kopf.Index, **_):
    """An ended experiment edited since it ended (its budget raised) may go on: its status becomes Running
    again, and the daemon above starts for it. (On raw watch events, as trials: a restarted operator
    sees every experiment once, and judges an edit it missed.)"""
    status = body.get("status") or {}
    if (event.get("type") == "DELETED" or not status.get("completionTime")
            or status.get("observedGeneration") == body["metadata"].get("generation")):
        return
    trials = list(trials_by_experiment.get((namespace, name), []))
    try:
        await asyncio.to_thread(controller.continue_if_raised, namespace, name, trials)
    except Exception as e:  # noqa: BLE001 - its observedGeneration is unchanged: judged again on its next event
        logger.warning("could not judge the edited experiment %s: %s", name, e)


@kopf.on.delete(G, V, "experiments")
async def forget_experiment(namespace, name, meta, logger, **_):
    """The finalizer: the experiment's keys on the metric bus go with it."""
    try:
        await asyncio.to_thread(controller.ask_service, "/v1/forget",
                                {"experiment": {"namespace": namespace, "name": name, "uid": meta["uid"]}})
    except OSError as e:
        raise kopf.TemporaryError(f"suggestion service unreachable: {e}", delay=2)
    _wake.pop((namespace, name), None)


# Trials are handled on raw watch events: kopf keeps no per-trial bookkeeping (no annotations
# written back on every change), and what this process already did is remembered here.
_started: set[tuple] = set()   # (trial uid, attempt, pod name) whose pod was ensured (a trial made again has a
                               # new uid; a retry, a new attempt and pod name; a paused trial's resume, a new pod)
_stopping: set[tuple] = set()  # (namespace, trial) whose pod is being stopped
_states: dict[tuple, str] = {}  # last state seen, to wake the experiment on a change
FINAL_STATES = ("Succeeded", "Failed", "Pruned", "Killed")


@kopf.on.event(G, V, "trials")
async def trial_changed(event, body, namespace, name, **_):
    key = (namespace, name)
    if event.get("type") == "DELETED":
        _states.pop(key, None)
        _stopping.discard(key)
        uid = body["metadata"].get("uid")
        _started.difference_update([k for k in _started if k[0] == uid])
        return
    status = body.get("status") or {}
    state, experiment = status.get("state"), body["spec"]["experiment"]
    if _states.get(key) != state:
        _states[key] = state
        wake(namespace, experiment)
    if state in FINAL_STATES:
        return
    stop = status.get("stop")
    if stop and key not in _stopping:
        # Pruned or paused (or the experiment ended): the SDK has been told; stop the pod if it lingers.
        _stopping.add(key)
        asyncio.create_task(_stop_pod(namespace, current_pod(body), stop))
    elif not stop:
        _stopping.discard(key)  # (a paused trial resumed may be told to pause again)
    run = (body["metadata"]["uid"], body["spec"].get("attempt", 1), current_pod(body))
    if not stop and state != "Paused" and run not in _started:
        _started.add(run)
        try:
            await asyncio.to_thread(controller.ensure_pod, dict(body))
        except Exception:
            _started.discard(run)  # try again on the next event
            raise


async def _stop_pod(namespace: str, pod: str, stop: dict) -> None:
    grace = {"Pruned": STOP_GRACE, "Paused": PAUSE_GRACE}.get(stop.get("state"), 0)
    await asyncio.sleep(grace)
    await asyncio.to_thread(controller.kube.delete_pod, namespace, pod)


@kopf.on.event("", "v1", "pods", labels=TRIAL_POD)
async def pod_changed(event, body, namespace, labels, trial_by_name: kopf.Index, **_):
    deleted = event.get("type") == "DELETED"
    cached = next(iter(trial_by_name.get((namespace, labels.get("kubetune.io/trial")), [])), None)
    experiment = await asyncio.to_thread(controller.on_pod, dict(body), deleted, cached)
    wake(namespace, experiment)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_):
    settings.persistence.finalizer = f"{G}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=G)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=G)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.execution.max_workers = 16
