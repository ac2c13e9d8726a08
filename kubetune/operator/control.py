"""The operator's decisions, level-based: read what the API holds, act, and keep no memory.

Every function here can run again at any moment (after a crash, twice at
once) without harm: trial and pod names are deterministic, so a second create
is a conflict, never a duplicate; final states are written once and never
overwritten.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..api.spec import ExperimentSpec
from ..api.trial import Trial, TrialState, best_of, resumes
from ..api.validation import check_spec, check_structure
from ..api import schema
from ..engine import check_end, goes_on, judge_exit
from ..study import prior_from, warm_start_trials
from ..engine.metric_lines import parse_metric_line
from .kube import Kube
from .pods import template_clashes, trial_container, trial_container_name, trial_pod
from .records import (current_pod, now_iso, owned_by, owns, parse_time, pod_name, pod_of_attempt, records,
                      trial_name, trial_resource, to_record)

log = logging.getLogger("kubetune.operator")

SPEC_CACHE_SECONDS = 1.0
SERVICE_WAIT_S = 60.0  # how long a trial's end waits for a suggestion service that is restarting
FOREIGN_POD_WAIT_S = 60.0  # how long a trial waits for the pod of an earlier trial of its name to go
STOP_GRACE = 5  # seconds a trial told to stop through the SDK has to exit by itself
PAUSE_GRACE = 30  # and one told to pause, which saves a checkpoint first (then the pod's own grace period)
CREATED_WAIT_S = 10.0  # how long a pass waits for the watch cache to show the trials the last one created
HOLD_CHECK_S = 2.0  # how often, with no trial to ask for, the service is checked to hold a running experiment
FINAL = {s.value for s in TrialState if s.finished}
PAUSED = TrialState.PAUSED.value  # neither active nor over: no pod, until the scheduler resumes it
NOT_PROMOTED = "not promoted: not in the top of its rung"
PAUSED_AT_END = "experiment ended while it waited for promotion"
DELETED = "the Trial was deleted"


class Controller:
    def __init__(self, kube: Kube, suggestion_url: str, bus: Mapping[str, Any] | None = None, clock=time.time):
        self.kube = kube
        self.suggestion_url = suggestion_url.rstrip("/")
        self.bus = dict(bus or {})
        self.clock = clock
        self._spec_cache: dict[tuple[str, str], tuple[float, dict | None]] = {}
        # Per experiment: what the suggestion service was last sent, and each trial's record by resource
        # version. A pass costs O(trials) in Python; these keep the O(trials) part to dictionary look-ups.
        # Lost on a restart, which only means the first pass sends and parses everything.
        self._sent: dict[tuple[str, str], _Sent] = {}
        self._records: dict[tuple[str, str], dict[str, tuple[str, Trial]]] = {}
        self._deleted: dict[tuple[str, str], set[int]] = {}  # numbers of trials deleted by hand, once seen gone
        self._uids: dict[tuple[str, str], str] = {}  # the experiment the three above are of

    # -- experiments ---------------------------------------------------------

    def reconcile_experiment(self, namespace: str, name: str, trials: list[dict] | None = None) -> bool:
        """One pass over an experiment; True once it is over and nothing of it runs.

        trials: its Trial resources as the operator's watch cache holds them (listed when not given).
        """
        over = self._reconcile(namespace, name, trials)
        if over:
            self._forget((namespace, name))
        return over

    def _forget(self, key: tuple[str, str]) -> None:
        for held in (self._sent, self._records, self._deleted, self._uids):
            held.pop(key, None)

    def _own(self, exp: dict) -> None:
        """What is held of an experiment of this name is this one's: not that of one deleted and applied again
        under it, whose last pass (that forgets it) never came (kopf stops a daemon on deletion). Its trial
        numbers deleted by hand are not this one's, nor is what it created moments ago."""
        key, uid = (exp["metadata"]["namespace"], exp["metadata"]["name"]), exp["metadata"]["uid"]
        if self._uids.get(key) != uid:
            self._forget(key)
            self._uids[key] = uid

    def _reconcile(self, namespace: str, name: str, resources: list[dict] | None) -> bool:
        exp = self.kube.get_experiment(namespace, name)
        if exp is None or exp["metadata"].get("deletionTimestamp"):
            return True
        status = exp.get("status") or {}
        if status.get("completionTime"):
            return True
        self._own(exp)
        problems = check_structure(exp["spec"], schema.SPEC, "spec") or check_spec(exp["spec"])
        if not problems and "seed" not in status:
            # Before it starts only: an experiment that set KUBETUNE_REDIS_CA_FILE itself (as the README once
            # said to) and runs on when the operator is given --redis-ca-secret gets the operator's CA instead.
            problems = template_clashes(exp["spec"], self.bus)
        if problems:
            message = "; ".join(str(p) for p in problems)
            if "seed" in status:  # an edit made it invalid while it ran: its trials end with it, as at any end
                for t in records(owned_by(self.kube.list_trials(namespace, name), exp)):
                    if t.state.active or t.state == TrialState.PAUSED:
                        self.request_stop(namespace, t.name, TrialState.KILLED, "experiment ended: InvalidSpec")
            self._finish(exp, "Failed", "InvalidSpec", message, {})
            self.event(exp, "Warning", "InvalidSpec", message)
            return True
        spec = ExperimentSpec.from_document(exp)
        if "seed" not in status:
            missing = self._missing_warm_start(exp, spec)
            if missing:  # as kubetune run: a name that names nothing is a mistake, not a cold start
                self._finish(exp, "Failed", "InvalidSpec", missing, {})
                self.event(exp, "Warning", "InvalidSpec", missing)
                return True
            status = exp["status"] = self._start(exp, spec)
        if resources is None:
            resources = self.kube.list_trials(namespace, name)
        trials, versions = self._records_of((namespace, name), owned_by(resources, exp))
        trials = self._with_deleted(exp, status, trials)
        if trials is None:
            return False  # trials created moments ago are not in the watch cache yet: the next pass has them
        now = self.clock()
        self._trial_timeouts(exp, spec, trials, now)
        best = best_trial(spec, trials)
        elapsed = run_time(status, now)
        completion = check_end(spec, trials, best, elapsed, bool(status.get("exhausted")))
        if completion is not None and self._cache_lags(exp, len(trials)):
            return False  # trials created moments ago are not in the list yet: not over without them
        paused = [t for t in trials if t.state == TrialState.PAUSED]
        if completion is not None and paused and completion.budget_spent:
            # Out of new trials, a paused one may still be promoted: over only once none is.
            if self._create_trials(exp, spec, status, trials, versions)[1]:
                return False
        if completion is not None:
            active = [t for t in trials if t.state.active]
            for t in active:
                self.request_stop(namespace, t.name, TrialState.KILLED, f"experiment ended: {completion.reason}")
            for t in paused:
                # Only if still as this pass saw it: a watch cache that lags a resume shows the trial Paused.
                if not self._end_paused(namespace, t.name, TrialState.PRUNED, PAUSED_AT_END, versions.get(t.number)):
                    return False  # changed since: the next pass judges it afresh
                t.state, t.reason = TrialState.PRUNED, PAUSED_AT_END  # (as counted below)
            if not active:
                phase = "Succeeded" if completion.succeeded else "Failed"
                self._finish(exp, phase, completion.reason, completion.message, counts(spec, trials))
                self.event(exp, "Normal" if completion.succeeded else "Warning", completion.reason, completion.message)
                return True
            return False
        exhausted = self._create_trials(exp, spec, status, trials, versions)[0]
        summary = counts(spec, trials)
        sent = self._sent.get((namespace, name))
        summary["created"] = max(len(trials), sent.suggested if sent is not None else 0)
        if exhausted:
            summary["exhausted"] = True
        if any(status.get(k) != v for k, v in summary.items()):
            self.kube.patch_experiment_status(namespace, name, summary)
        return False

    def _start(self, exp: dict, spec: ExperimentSpec) -> dict:
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
        status = {"seed": seed, "startTime": now_iso(), "phase": "Running",
                  "conditions": [_condition("Running", "True", "ExperimentStarted", "trials are being created")]}
        meta = exp["metadata"]
        self.kube.patch_experiment_status(meta["namespace"], meta["name"], status)
        self.event(exp, "Normal", "Started", f"algorithm {spec.algorithm['name']}, seed {seed}, "
                                             f"up to {spec.budget.max_trials} trials, {spec.budget.parallel_trials} at a time")
        return status

    def _with_deleted(self, exp: dict, status: dict, trials: list[Trial]) -> list[Trial] | None:
        """Every trial number created so far, in order: a Trial deleted by hand (kubectl delete trial) stands
        in as Killed, so that its number is never used again (its checkpoints and metric stream are still
        there) and the list stays indexed by number. None while a missing trial still exists: the watch
        cache lags its creation."""
        created = max(int(status.get("created") or 0), trials[-1].number + 1 if trials else 0)
        if len(trials) == created:
            return trials
        meta = exp["metadata"]
        deleted = self._deleted.setdefault((meta["namespace"], meta["name"]), set())
        present = {t.number: t for t in trials}
        for number in range(created):
            if number not in present and number not in deleted:
                body = self.kube.get_trial(meta["namespace"], trial_name(meta["name"], number))
                if body is not None and owns(exp, body):
                    return None
                deleted.add(number)  # (for good: the operator never creates a number twice)
        return [present.get(n) or Trial(n, {}, TrialState.KILLED, reason=DELETED, name=trial_name(meta["name"], n))
                for n in range(created)]

    def _records_of(self, key: tuple[str, str], resources: list[dict]) -> tuple[list[Trial], dict[int, str]]:
        """The trials' records in number order, and each one's resourceVersion; parsed again only when changed."""
        known, fresh, versions = self._records.get(key, {}), {}, {}
        for r in resources:
            meta = r["metadata"]
            version = meta.get("resourceVersion", "")
            hit = known.get(meta["uid"])
            record = hit[1] if hit is not None and hit[0] == version and version else to_record(r)
            fresh[meta["uid"]] = (version, record)
            versions[record.number] = version
        self._records[key] = fresh
        return sorted((rec for _, rec in fresh.values()), key=lambda t: t.number), versions

    def _create_trials(self, exp: dict, spec: ExperimentSpec, status: dict, trials: list[Trial],
                       versions: dict[int, str]) -> tuple[bool, int]:
        """Fills free slots: new trials, or paused ones resumed (pausing schedulers). Returns whether the
        sampler is exhausted, and how many paused trials were resumed."""
        active = sum(1 for t in trials if t.state.active)
        paused = any(t.state == TrialState.PAUSED for t in trials)
        slots = spec.budget.parallel_trials - active
        new = 0 if status.get("exhausted") else max(0, spec.budget.max_trials - len(trials))
        wanted = min(slots, new if not paused else slots)
        if wanted <= 0:
            if active and self._hold_due(exp, len(trials)):
                # Nothing to ask for, but the service must still hold the experiment while trials run: one
                # restarted since has no scheduler loop reading their reports until it is sent it again.
                try:
                    self._suggest(exp, spec, trials, versions, 0)
                except OSError as e:  # (the pass goes on: its status counts need no service)
                    log.warning("suggestion service unreachable for %s: %s", exp["metadata"]["name"], e)
            return bool(status.get("exhausted")), 0
        meta = exp["metadata"]
        key = (meta["namespace"], meta["name"])
        if self._cache_lags(exp, len(trials)):
            # Their slots are not free, and the service, sent a list without them, would drop them (a paused
            # trial resumed in their place).
            return bool(status.get("exhausted")), 0
        try:
            answer = self._suggest(exp, spec, trials, versions, wanted, new)
        except OSError:
            # Its answer may be lost after the service acted on it: a paused trial it resumed stays Paused
            # in the API, unchanged, so only the whole list (the API's word wins) makes it resumable again.
            self._sent.pop(key, None)
            raise
        fresh = [s for s in answer["suggestions"] if not s.get("resume")]
        self._sent[key].suggested = len(trials)
        try:
            for number in answer.get("pruned", ()):  # paused trials that lost for good (synchronous HyperBand)
                if number < len(trials) and trials[number].state == TrialState.PAUSED:
                    self._end_paused(meta["namespace"], trials[number].name, TrialState.PRUNED, NOT_PROMOTED,
                                     versions.get(number))
            resumed = [s for s in answer["suggestions"] if s.get("resume") and self._resume(meta, trials, versions, s)]
            for s in fresh:
                if self.kube.create_trial(trial_resource(exp, s["number"], s["params"], assignment=s.get("assignment"))):
                    self._sent[key].suggested = max(self._sent[key].suggested, s["number"] + 1)
                    log.info("created trial %s-%04d", meta["name"], s["number"])
        except Exception:
            # The service took these as done: sent the whole list next time, it takes the API's word again.
            self._sent.pop(key, None)
            raise
        return bool(answer.get("exhausted")), len(resumed)

    def _resume(self, meta: dict, trials: list[Trial], versions: dict[int, str], s: dict) -> bool:
        """A paused trial promoted: it runs on from its checkpoint in a new pod, as the same attempt (its
        reports go on after the ones before), with the budget of its next rung (in its events)."""
        number = s["number"]
        trial = trials[number] if number < len(trials) else None
        if trial is None or trial.state != TrialState.PAUSED:
            return False  # changed since it was sent: the service hears of it with the next request
        pod = pod_name(trial.name, trial.attempt, resumes(s["events"]))
        # Only if the trial is still as this pass saw it: a watch cache that lags a resume shows it Paused, and
        # a service sent that copy resumes it again (a second pod, named for a second resume, beside the first).
        if not self.kube.patch_trial_status(meta["namespace"], trial.name, {
                "state": "Pending", "podName": pod, "reason": "", "startTime": None, "stop": None,
                "events": s["events"][-200:]}, resource_version=versions.get(number)):
            return False  # changed since: the service is sent its new version with the next request
        log.info("resumed trial %s in pod %s", trial.name, pod)
        return True

    def _end_paused(self, namespace: str, name: str, state: TrialState, reason: str,
                    resource_version: str | None = None) -> bool:
        """A paused trial (no pod) ends where it stopped: not promoted, or the experiment is over.
        resource_version: only if it is still at it (False when not)."""
        if not self.kube.patch_trial_status(namespace, name, {"state": state.value, "reason": reason, "stop": None,
                                                              "completionTime": now_iso()}, resource_version):
            return False
        log.info("trial %s %s %s", name, state.value, reason)
        return True

    def _cache_lags(self, exp: dict, total: int) -> bool:
        """Whether the watch cache lacks trials created moments ago (total, below what was created)."""
        sent = self._sent.get((exp["metadata"]["namespace"], exp["metadata"]["name"]))
        return sent is not None and total < sent.suggested and time.monotonic() - sent.at < CREATED_WAIT_S

    def _hold_due(self, exp: dict, total: int) -> bool:
        """Whether to check, with an empty request, that the service holds the experiment (every HOLD_CHECK_S).
        Not while the watch cache lacks trials created since (total, below what was suggested): the service
        would drop them until they were sent, and answer their first reports `stop`."""
        sent = self._sent.get((exp["metadata"]["namespace"], exp["metadata"]["name"]))
        return sent is None or (time.monotonic() - sent.at >= HOLD_CHECK_S and total >= sent.suggested)

    def _suggest(self, exp: dict, spec: ExperimentSpec, trials: list[Trial], versions: dict[int, str],
                 count: int, new: int | None = None) -> dict:
        """Asks for `count` new trials, sending the service only the trials changed since it was last sent
        them; the whole experiment when it does not hold what was sent (restarted, or spec changed)."""
        meta = exp["metadata"]
        key, ident = (meta["namespace"], meta["name"]), (meta["uid"], meta.get("generation"))
        sent = self._sent.get(key)
        if sent is not None and sent.ident == ident:
            changed = [t for t in trials if sent.versions.get(t.number) != versions.get(t.number)]
            answer = self.ask_service("/v1/suggest", {
                "experiment": {"namespace": key[0], "name": key[1]}, "epoch": sent.epoch,
                "changed": [t.to_dict() for t in changed], "total": len(trials), "count": count, "new": new})
            if not answer.get("resync"):
                sent.versions.update((t.number, versions.get(t.number)) for t in changed)
                sent.at = time.monotonic()
                return answer
        answer = self.ask_service("/v1/suggest", {**self._context(exp, spec, trials), "count": count, "new": new})
        self._sent[key] = _Sent(ident, answer["epoch"], dict(versions))
        return answer

    def _context(self, exp: dict, spec: ExperimentSpec, trials: list[Trial]) -> dict:
        """What the suggestion service needs to (re)build an experiment: spec, seed, trials, prior."""
        return {"experiment": _ref(exp), "document": exp, "seed": (exp.get("status") or {})["seed"],
                "trials": [t.to_dict() for t in trials], "prior": [t.to_dict() for t in self._prior(exp, spec)]}

    def _prior(self, exp: dict, spec: ExperimentSpec) -> list[Trial]:
        """Warm start: finished trials of the named earlier experiments in this namespace (their own: not
        those of one deleted earlier under the same name, which the garbage collector has not removed),
        valued by this experiment's objective."""
        return prior_from(spec.space, [t for _, trials, _ in self._warm_start(exp, spec) for t in trials])

    def _warm_start(self, exp: dict, spec: ExperimentSpec) -> list[tuple[str, list[Trial], str]]:
        """Per warmStart name: its trials (valued by this experiment's objective, see warm_start_trials), and
        why it cannot be used (as an InvalidSpec message naming the field; "" when it can)."""
        namespace = exp["metadata"]["namespace"]
        out = []
        for i, name in enumerate(spec.warm_start_from):
            where = f"spec.warmStart.fromExperiments[{i}]"
            other = self.kube.get_experiment(namespace, name)
            if other is None:  # (or deleted since this one started: its trials go with it)
                out.append((name, [], f"{where}: no experiment {name!r} in namespace {namespace}"))
                continue
            trials, problem = warm_start_trials(where, name, other["spec"].get("objective") or {},
                                                exp["spec"]["objective"],
                                                records(owned_by(self.kube.list_trials(namespace, name), other)))
            out.append((name, trials, str(problem) if problem else ""))
        return out

    def _missing_warm_start(self, exp: dict, spec: ExperimentSpec) -> str:
        """What makes warmStart unusable, as an InvalidSpec message: a name that names no experiment in the
        namespace, or one that optimised another objective (and recorded none of this one's metric)."""
        return "; ".join(why for _, _, why in self._warm_start(exp, spec) if why)

    def _trial_timeouts(self, exp: dict, spec: ExperimentSpec, trials: list[Trial], now: float) -> None:
        limit = spec.budget.trial_timeout
        if limit is None:
            return
        for t in trials:
            if t.state == TrialState.RUNNING and t.started_at is not None and now - t.started_at > limit:
                self.request_stop(exp["metadata"]["namespace"], t.name, TrialState.FAILED,
                                  f"exceeded trialTimeout ({int(limit)}s)")

    def _finish(self, exp: dict, phase: str, reason: str, message: str, summary: dict) -> None:
        meta = exp["metadata"]
        # observedGeneration: the spec it ended under; an edit since is judged by continue_if_raised.
        status = {**summary, "phase": phase, "completionTime": now_iso(), "observedGeneration": meta.get("generation"),
                  "conditions": [_condition("Running", "False", reason, message),
                                 _condition(phase, "True", reason, message)]}
        self.kube.patch_experiment_status(meta["namespace"], meta["name"], status)

    def continue_if_raised(self, namespace: str, name: str, resources: list[dict] | None = None) -> bool:
        """An ended experiment whose spec was edited since it ended goes on when what ended it no longer holds
        under the new budget (engine.goes_on: maxTrials, maxFailedTrials or timeout raised), as `kubetune run`
        of an edited spec does; never after GoalReached, SearchSpaceExhausted or InvalidSpec. True when it goes
        on: its status is Running again, and the time it spent ended does not count toward budget.timeout.

        resources: its Trial resources as the operator's watch cache holds them (listed when not given)."""
        exp = self.kube.get_experiment(namespace, name)
        if exp is None or exp["metadata"].get("deletionTimestamp"):
            return False
        meta, status = exp["metadata"], exp.get("status") or {}
        ended = status.get("completionTime")
        if not ended or status.get("observedGeneration") == meta.get("generation"):
            return False
        reason = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == status.get("phase")),
                      None)
        spec = ExperimentSpec.from_document(exp)
        if resources is None:
            resources = self.kube.list_trials(namespace, name)
        trials = records(owned_by(resources, exp))
        self._own(exp)
        trials = self._with_deleted(exp, status, trials) or trials  # (deleted ones count, as while it ran)
        elapsed = run_time(status, parse_time(ended))
        # (No observedGeneration: ended by an operator from before it was kept, which took no edit of an ended
        # experiment. Recorded as judged, not judged: its trials may have been cleaned up since, and without
        # status.created nothing shows they existed; an edit from now on is judged.)
        not_to_judge = "seed" not in status or "observedGeneration" not in status  # (never started, or see above)
        if not_to_judge or not goes_on(spec, trials, best_trial(spec, trials), elapsed, reason,
                                       bool(status.get("exhausted"))):
            # Judged for this generation: not again until the next edit.
            self.kube.patch_experiment_status(namespace, name, {"observedGeneration": meta.get("generation")},
                                              resource_version=meta["resourceVersion"])
            return False
        message = f"its budget was changed and {reason} no longer holds; {len(trials)} trials so far"
        if not self.kube.patch_experiment_status(namespace, name, {
                "phase": "Running", "completionTime": None, "observedGeneration": None,
                "continuedTime": now_iso(), "elapsedBefore": elapsed,
                "conditions": [_condition("Running", "True", "ExperimentContinued", message)]},
                resource_version=meta["resourceVersion"]):
            return False  # changed since: its next event judges it afresh
        self.event(exp, "Normal", "Continued", message)
        log.info("experiment %s/%s continues: %s", namespace, name, message)
        return True

    # -- trials and their pods -----------------------------------------------

    def ensure_pod(self, trial: dict) -> None:
        """A trial that is not over has a pod for its current attempt."""
        status = trial.get("status") or {}
        if status.get("state") in FINAL or status.get("state") == PAUSED or status.get("stop") or not pod_of_attempt(trial):
            return  # (a paused trial gets its next pod when it is resumed)
        exp = self._experiment_of(trial)
        if exp is None:
            return
        if status.get("state") == "Running" and self._lost_unseen(trial):
            return
        # No status write here: a trial without a state is Pending, and its pod's name follows from its attempt.
        pod = trial_pod(ExperimentSpec.from_document(exp), trial, self.bus)
        if not self.kube.create_pod(pod):
            self._replace_foreign_pod(trial, pod)
            return
        # Ended meanwhile (its experiment's end found no pod to stop, and recorded it): nothing else would
        # stop this pod, as events of a finished trial's pod are ignored.
        now = self.kube.get_trial(trial["metadata"]["namespace"], trial["metadata"]["name"])
        if now is None or now["metadata"]["uid"] != trial["metadata"]["uid"] or (
                (now.get("status") or {}).get("state") in FINAL):
            self.kube.delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"], grace=0)

    def _lost_unseen(self, trial: dict) -> bool:
        """A trial whose pod ran and is gone, unseen (deleted while this operator was down), runs again as a
        new attempt: making the same attempt's pod again would run it afresh under the old attempt, its
        reports going on after the lost pod's in one record."""
        namespace, name = trial["metadata"]["namespace"], trial["metadata"]["name"]
        if self.kube.get_pod(namespace, current_pod(trial)) is not None:
            return False
        fresh = self.kube.get_trial(namespace, name)  # (the event's copy may be stale, and is read-only)
        status = (fresh or {}).get("status") or {}
        if (fresh is None or fresh["metadata"]["uid"] != trial["metadata"]["uid"] or status.get("state") != "Running"
                or current_pod(fresh) != current_pod(trial)):
            return True  # gone, over or retried since: its own events see to it
        if status.get("stop"):  # as its pod's deletion would have: it ends as it was told to
            self._finish_trial(fresh, None, "")
        else:
            self._retry(fresh, f"pod {current_pod(fresh)} was deleted before it finished")
        return True

    def _replace_foreign_pod(self, trial: dict, pod: dict) -> None:
        """The pod's name is taken. By this trial's own pod (created before a restart): nothing to do. By a
        pod of the trial of the same name of an experiment deleted and applied again, which the garbage
        collector has not removed yet: it goes first (as the collector would remove it), then ours."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        owners = self.kube.pod_owners(namespace, name)
        if owners is None:  # gone since
            self.kube.create_pod(pod)
        if owners is None or trial["metadata"]["uid"] in owners:
            return
        self.kube.delete_pod(namespace, name, grace=0)
        deadline = time.monotonic() + FOREIGN_POD_WAIT_S
        while self.kube.pod_owners(namespace, name) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {namespace}/{name} of an earlier experiment's trial is still there")
            time.sleep(0.2)
        self.kube.create_pod(pod)

    def on_pod(self, pod: Mapping[str, Any], deleted: bool = False, cached: Mapping | None = None) -> str | None:
        """A trial pod changed; returns its experiment's name when the trial's state changed.

        cached: the trial from the operator's watch cache, good enough while the pod merely runs;
        an ending pod is judged against the trial as the API holds it now.
        """
        meta = pod["metadata"]
        trial_name = (meta.get("labels") or {}).get("kubetune.io/trial")
        phase = (pod.get("status") or {}).get("phase")
        # The trial is over when its own container is, though sidecars (a log shipper, an injected proxy) run on
        # and keep the pod Running; a sidecar's exit is never the trial's.
        code, error = _exit_of(pod)
        exited = phase in ("Succeeded", "Failed") or code is not None
        ending = deleted or meta.get("deletionTimestamp") or exited
        if cached is not None and not ending and owns(cached, pod) and current_pod(cached) == meta["name"]:
            trial = dict(cached)  # (one naming another pod may lag a retry that made this one: read it)
        else:
            trial = self.kube.get_trial(meta["namespace"], trial_name) if trial_name else None
        if trial is None or not owns(trial, pod):
            return None  # (a pod of an earlier trial of this name: its experiment was deleted and made again)
        status = trial.get("status") or {}
        if status.get("state") in FINAL or status.get("state") == PAUSED or current_pod(trial) != meta["name"]:
            # Over, paused (this pod's end recorded), or the pod of an earlier run. Its sidecars may still run,
            # the operator gone between recording the trial's end and deleting the pod: nothing else would.
            self._stop_sidecars(pod, deleted, exited)
            return None
        experiment = trial["spec"]["experiment"]
        # (A pod being deleted whose trial container is over but whose sidecars are not counts as lost too: its
        # container may have been killed by that deletion, and this operator deletes such pods only once their
        # trial's end is recorded.)
        lost = (meta.get("deletionTimestamp") and phase not in ("Succeeded", "Failed")) or (
            phase == "Failed" and _disrupted(pod))
        if lost and not status.get("stop"):
            # Evicted (its node was lost) or deleted by someone: the trial runs again in a new pod. So too for
            # a pod the control plane failed for it (the pod garbage collector, for a node gone for good;
            # node-pressure eviction): it says so in a DisruptionTarget condition.
            self._retry(trial, f"pod {meta['name']} was evicted or deleted before it finished")
            self.kube.delete_pod(meta["namespace"], meta["name"], grace=0)
            return experiment
        if exited:  # (first: a pod first seen Running with its trial's container over has no later event)
            self._finish_trial(trial, code, error)
            self._stop_sidecars(pod, deleted, exited)  # (once the trial's end is recorded: see above)
            return experiment
        if phase == "Running" and status.get("state") != "Running" and not deleted:
            self.kube.patch_trial_status(meta["namespace"], trial_name,
                                         {"state": "Running", "startTime": now_iso(), "podName": meta["name"]})
            return experiment
        if deleted:
            if status.get("stop"):
                self._finish_trial(trial, None, "")
            else:
                self._retry(trial, "its pod was deleted before it finished")
            return experiment
        return None

    def _stop_sidecars(self, pod: Mapping[str, Any], deleted: bool, exited: bool) -> None:
        """Deletes a pod whose trial container is over while other containers (sidecars) keep it Running: it
        holds its node's GPU until they stop. Only that pod (by uid): its name may be taken again since. Not
        for native sidecars (initContainers with restartPolicy Always) alone: the kubelet stops those itself,
        and the pod, Succeeded or Failed, stays for its logs as any trial's."""
        meta, status = pod["metadata"], pod.get("status") or {}
        others_run = any("terminated" not in (cs.get("state") or {}) for cs in status.get("containerStatuses") or [])
        if (exited and others_run and not deleted and not meta.get("deletionTimestamp")
                and status.get("phase") not in ("Succeeded", "Failed")):
            log.info("stopping the sidecars of pod %s: its trial container is over", meta["name"])
            self.kube.delete_pod(meta["namespace"], meta["name"], uid=meta.get("uid"))

    def request_stop(self, namespace: str, name: str, state: TrialState, reason: str) -> None:
        """Marks how the trial ends, then stops its pod; the pod's end records it."""
        trial = self.kube.get_trial(namespace, name)
        if trial is None:
            return
        status = trial.get("status") or {}
        if status.get("state") in FINAL:
            return
        if status.get("state") == PAUSED:  # no pod to stop
            self._end_paused(namespace, name, state, reason)
            return
        if not status.get("stop"):
            self.kube.patch_trial_status(namespace, name, {"stop": {"state": state.value, "reason": reason}})
        current = current_pod(trial)
        if self.kube.get_pod(namespace, current) is None:
            trial["status"] = {**status, "stop": {"state": state.value, "reason": reason}}
            self._finish_trial(trial, None, "")
        else:
            self.kube.delete_pod(namespace, current)

    def _finish_trial(self, trial: dict, exit_code: int | None, error: str) -> None:
        meta, status = trial["metadata"], trial.get("status") or {}
        exp = self._experiment_of(trial)
        if exp is None:
            return
        spec = ExperimentSpec.from_document(exp)
        record = to_record(trial)
        reported = self._reported(exp, spec, record)
        if not reported.get("intermediate") and not record.intermediate and spec.collector_kind in ("auto", "stdout"):
            reported = {**reported, **self._from_log(spec, meta["namespace"], current_pod(trial))}
        values = [v for _, v in reported.get("intermediate", record.intermediate)]
        stop = status.get("stop") or _decided_stop(reported)
        if stop and stop["state"] == PAUSED:
            if exit_code is None or exit_code <= 0 or exit_code > 128:
                # Checkpointed and gone, or stopped by a signal once its grace ran out (checkpoints are
                # written atomically: the last whole one stands): resumed from it when promoted.
                self.kube.patch_trial_status(meta["namespace"], meta["name"], {
                    "state": PAUSED, "reason": stop["reason"], "stop": None,
                    "intermediate": reported.get("intermediate", record.intermediate)[-1000:],
                    "metrics": reported.get("metrics", record.metrics)})
                log.info("trial %s Paused %s", meta["name"], stop["reason"])
                return
            stop = None  # it failed while saving its checkpoint: judged by its exit, as any failed run
        if stop and not (stop["state"] == "Killed" and exit_code == 0):
            state = TrialState(stop["state"])
            value = spec.objective.pick(values) if values and state != TrialState.FAILED else None
            reason = stop["reason"]
        else:
            state, value, reason = judge_exit(spec.objective.metric, spec.objective.pick, values, exit_code, error)
        final = {"state": state.value, "reason": reason, "completionTime": now_iso(),
                 "intermediate": reported.get("intermediate", record.intermediate)[-1000:],
                 "metrics": reported.get("metrics", record.metrics)}
        if value is not None and math.isfinite(value):
            final["value"] = value
        self.kube.patch_trial_status(meta["namespace"], meta["name"], final)
        log.info("trial %s %s %s", meta["name"], state.value, reason)

    def _reported(self, exp: dict, spec: ExperimentSpec, record: Trial) -> dict:
        """The trial's reported values, once the suggestion service has taken all it sent."""
        meta = exp["metadata"]
        # With its attempt: a service not told of a retry (that request failed) drops the lost attempt's reports.
        request = {"experiment": _ref(exp), "trial": record.number, "ended": True, "attempt": record.attempt}
        # A service restarting (its pod replaced) is waited for: the reports the trial sent meanwhile are
        # on the bus, and only the service takes them; what the API holds may lack the last ones.
        deadline = time.monotonic() + SERVICE_WAIT_S
        while True:
            try:
                got = self.ask_service("/v1/flush", request)
                if not got.get("known"):
                    # A restarted service: send the whole context so it rebuilds the experiment first.
                    trials = records(owned_by(self.kube.list_trials(meta["namespace"], meta["name"]), exp))
                    got = self.ask_service("/v1/flush", {**self._context(exp, spec, trials), **request})
                return got if got.get("known") else {}
            except OSError as e:
                if time.monotonic() >= deadline:
                    log.warning("suggestion service unreachable for %s: %s; using what the API holds", record.name, e)
                    return {}
                time.sleep(0.5)

    def _from_log(self, spec: ExperimentSpec, namespace: str, pod: str | None) -> dict:
        """Metrics printed by a trial that does not use the SDK (`epoch=3 val_accuracy=0.91`)."""
        if not pod:
            return {}
        intermediate, metrics = [], {}
        for line in self.kube.pod_log(namespace, pod, trial_container_name(spec)).splitlines():
            found = parse_metric_line(line, spec.metric_format)
            if spec.objective.metric in found:
                step = next((found[k] for k in ("step", "epoch", "iteration") if k in found), len(intermediate) + 1)
                intermediate.append([float(step), found.pop(spec.objective.metric)])
            metrics.update(found)
        return {"intermediate": intermediate, "metrics": metrics} if intermediate else {}

    def _retry(self, trial: dict, why: str) -> None:
        """A pod lost before it finished (its node went away): run the trial again, as a new attempt."""
        meta = trial["metadata"]
        while True:  # trials lost together (one node) are retried at once, in threads: each counts
            exp = self.kube.get_experiment(meta["namespace"], trial["spec"]["experiment"])  # fresh: its retry count
            if exp is None or not owns(exp, trial):
                return
            spec = ExperimentSpec.from_document(exp)
            retries = int((exp.get("status") or {}).get("retries", 0))
            if retries >= spec.budget.max_failed_trials:
                self._finish_trial(trial, None, why)
                return
            if self.kube.patch_experiment_status(meta["namespace"], exp["metadata"]["name"], {"retries": retries + 1},
                                                 resource_version=exp["metadata"]["resourceVersion"]):
                break
        record = to_record(trial)
        record.start_over()  # its reports go, and with them the exploits that point into them
        attempt = record.attempt
        # The new pod's name first, so events of the old pod are ignored from now on.
        self.kube.patch_trial_status(meta["namespace"], meta["name"], {
            "state": "Pending", "podName": pod_name(meta["name"], attempt), "startTime": None,
            "intermediate": record.intermediate, "metrics": record.metrics, "events": record.events})
        self.kube.patch_trial(meta["namespace"], meta["name"], {"spec": {"attempt": attempt}})
        self.event(exp, "Warning", "TrialRetried", f"trial {meta['name']}: {why}; attempt {attempt}")
        try:  # before the new pod reports: the service drops what it holds of the lost attempt
            self.ask_service("/v1/flush", {"experiment": _ref(exp), "trial": int(trial["spec"]["number"]),
                                           "attempt": attempt})
        except OSError as e:  # a restarted service reads the trial from the API, as reset above
            log.warning("suggestion service unreachable while retrying %s: %s", meta["name"], e)
        trial["spec"]["attempt"] = attempt
        trial["status"] = {"state": "Pending"}
        self.ensure_pod(trial)

    # -- plumbing --------------------------------------------------------------

    def _experiment_of(self, trial: dict) -> dict | None:
        """The trial's experiment, for its spec; None when the trial belongs to one deleted since (an
        experiment of the same name may exist again: its spec is not this trial's to use)."""
        key = (trial["metadata"]["namespace"], trial["spec"]["experiment"])
        exp = self._experiment_spec_source(*key)
        if exp is not None and not owns(exp, trial):
            self._spec_cache.pop(key, None)  # cached before the experiment was created again?
            exp = self._experiment_spec_source(*key)
        return exp if exp is not None and owns(exp, trial) else None

    def _experiment_spec_source(self, namespace: str, name: str) -> dict | None:
        """The experiment for reading its spec (pod template, objective): fetched at most once a
        second, since every trial's start and end needs it and the search part cannot change."""
        key, now = (namespace, name), time.monotonic()
        hit = self._spec_cache.get(key)
        if hit is not None and now - hit[0] < SPEC_CACHE_SECONDS:
            return hit[1]
        exp = self.kube.get_experiment(namespace, name)
        self._spec_cache[key] = (now, exp)
        return exp

    def ask_service(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.suggestion_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def event(self, obj: dict, kind: str, reason: str, message: str) -> None:
        try:
            self.kube.event(obj, kind, reason, message)
        except Exception as e:  # noqa: BLE001 - an event is a courtesy, never a reason to fail
            log.debug("event not posted: %s", e)


def _decided_stop(reported: dict) -> dict | None:
    """How the service's scheduler ended the trial (pruned, or paused at a rung), when its word that the
    pod should stop did not reach the API before the pod ended."""
    state = reported.get("state")
    if state in ("Pruned", PAUSED):
        return {"state": state, "reason": reported.get("reason") or state.lower()}
    return None


def _ref(exp: dict) -> dict:
    """How the suggestion service names an experiment: with its uid, which keys its metric bus stream
    (a service restarted and first asked to flush builds the experiment from this)."""
    meta = exp["metadata"]
    return {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}


@dataclass
class _Sent:
    ident: tuple  # the experiment's uid and generation: a changed spec is sent whole
    epoch: str  # the service's name for what it holds
    versions: dict[int, str | None]  # trial number -> resourceVersion sent
    at: float = field(default_factory=time.monotonic)  # when the service last answered for it
    suggested: int = 0  # trials up to this number were created (or were there)


def run_time(status: Mapping[str, Any], now: float) -> float:
    """How long the experiment has run by `now`, as budget.timeout measures it: since it started, less the
    time it spent ended before it was continued (elapsedBefore is what it had run by then)."""
    since = parse_time(status.get("continuedTime") or status.get("startTime"))
    return float(status.get("elapsedBefore") or 0.0) + (now - since if since is not None else 0.0)


def best_trial(spec: ExperimentSpec, trials: list[Trial]) -> Trial | None:
    return best_of(trials, spec.objective.goal)


def counts(spec: ExperimentSpec, trials: list[Trial]) -> dict:
    by = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    out = {"trials": len(trials), "running": by[TrialState.RUNNING] + by[TrialState.PENDING],
           "succeeded": by[TrialState.SUCCEEDED], "pruned": by[TrialState.PRUNED], "failed": by[TrialState.FAILED],
           "killed": by[TrialState.KILLED], "paused": by[TrialState.PAUSED]}
    best = best_trial(spec, trials)
    if best is not None:
        out["bestObjective"] = best.value
        out["bestTrial"] = {"name": best.name, "value": best.value, "params": best.params}
    return out


def _condition(kind: str, status: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": now_iso()}


def _disrupted(pod: Mapping[str, Any]) -> bool:
    """Whether the pod was failed by the control plane, not by its container's exit."""
    status = pod.get("status") or {}
    return status.get("reason") == "Evicted" or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or [])


def _exit_of(pod: Mapping[str, Any]) -> tuple[int | None, str]:
    """The exit code and last message line of the pod's trial container, once it has terminated: never a
    sidecar's (a regular one, or a native one in initContainerStatuses)."""
    name = trial_container(pod)
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated and cs.get("name") == name:
            # Its termination message (the last log lines of a failure; what the SDK said of reports lost); a
            # failure without one shows the kubelet's reason ("Error", "OOMKilled"), a clean exit nothing.
            code = terminated.get("exitCode")
            message = (terminated.get("message") or (terminated.get("reason") if code != 0 else "") or "").strip()
            if terminated.get("reason") == "OOMKilled":
                message = "OOMKilled"  # (its message is the log's end too: the last line printed, not why it ended)
            return code, message.splitlines()[-1] if message else ""
    return None, (pod.get("status") or {}).get("reason", "")
