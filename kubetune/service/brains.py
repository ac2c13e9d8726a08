"""What the suggestion service holds for each experiment: its Study, fed from the API.

Nothing here is the only copy of anything. The operator sends the experiment's
trial records (read from the API) with each request; the Study is brought in
line with them, so a restarted service answers exactly as the old one would
have (samplers are pure functions of the trial list). Reported values arrive
from the metric bus and are written back to the Trial resources before the
bus is acknowledged.
"""

from __future__ import annotations

import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..api.spec import ExperimentSpec
from ..api.trial import Trial, TrialState, resumes
from ..bus.base import experiment_key
from ..operator.records import trial_name
from ..study import SearchExhausted, Study


@dataclass
class Brain:
    key: str  # namespace/name
    uid: str
    fingerprint: str
    study: Study
    metric: str  # the objective metric, the one the scheduler acts on
    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: set[int] = field(default_factory=set)  # trials with reports not yet written to the API
    # Names this Brain to the operator, which then sends only what changed; a new Brain (this service
    # restarted, or the experiment's search spec changed) has a new epoch, and gets the whole list again.
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    api_states: dict[int, TrialState] = field(default_factory=dict)  # each trial's state as the API last showed it

    @property
    def bus_key(self) -> str:
        """Its key on the metric bus, as its pods have it (KUBETUNE_BUS_KEY)."""
        namespace, name = self.key.split("/", 1)
        return experiment_key(namespace, name, self.uid)

    def sync(self, records: list[Trial]) -> None:
        """The API's records win for state; reported values kept here that the API lacks stay."""
        mine = {t.number: t for t in self.study.trials}
        self.api_states = {r.number: r.state for r in records}
        merged = [_merge(mine.get(r.number), r) for r in records]
        # A trial asked for but never created is dropped; it will be asked for again, identically.
        contiguous = [t for i, t in enumerate(merged) if t.number == i]
        self.study.trials[:] = contiguous
        self.dirty &= {t.number for t in contiguous}

    def update(self, changed: list[Trial], total: int) -> bool:
        """sync() for the records that changed since the last request; total: how many trials the API holds.
        False when the changes leave a gap that only the whole list can fill."""
        trials = self.study.trials
        for r in sorted(changed, key=lambda t: t.number):
            self.api_states[r.number] = r.state
            if r.number < len(trials):
                trials[r.number] = _merge(trials[r.number], r)
            elif r.number == len(trials):
                trials.append(r)
            else:
                return False
        del trials[total:]  # asked for, not (yet) created: asked for again, identically
        self.dirty &= set(range(len(trials)))
        return True

    def suggest(self, count: int, new: int | None = None) -> tuple[list[dict], bool, list[int]]:
        """Up to `count` trials for free workers, at most `new` of them new configurations (all by default).
        With a scheduler that pauses trials, some may be paused trials to resume from their checkpoints:
        {"number", "params", "resume": True, "events"}, the resume recorded in the events. Also whether
        the sampler has no new configuration left, and the paused trials it pruned meanwhile (synchronous
        HyperBand's losers at a rung), for the operator to record."""
        new = count if new is None else new
        out, exhausted = [], False
        paused = [t for t in self.study.trials if t.state == TrialState.PAUSED]
        # Resumed here, still Paused as the operator last showed it (its watch cache lags the resume): it
        # counted that slot free, but the trial's new pod holds it.
        count -= sum(1 for t in self.study.trials if t.state in (TrialState.PENDING, TrialState.RUNNING)
                     and self.api_states.get(t.number) == TrialState.PAUSED)
        with self._pausing_pods_running():
            while len(out) < count:
                known = len(self.study.trials)
                try:
                    t = self.study.ask(new=new > 0 and not exhausted)
                except SearchExhausted:
                    exhausted = True
                    continue
                if t is None:
                    break
                if t.number < known:  # a paused trial, resumed
                    out.append({"number": t.number, "params": t.params, "resume": True, "events": t.events})
                    continue
                t.name = trial_name(self.key.split("/", 1)[1], t.number)
                new -= 1
                assignment = next((e for e in t.events if e.get("event") == "assign"), None)
                out.append({"number": t.number, "params": t.params, **(
                    {"assignment": {"bracket": assignment["bracket"], "budget": assignment["budget"]}}
                    if assignment else {})})
        return out, exhausted, [t.number for t in paused if t.state == TrialState.PRUNED]

    @contextmanager
    def _pausing_pods_running(self):
        """Trials paused here whose pod the API still shows running (saving its checkpoint, exiting) are
        not the scheduler's to resume yet: they count as running while it picks, as in the local engine."""
        pausing = [t for t in self.study.trials
                   if t.state == TrialState.PAUSED and self.api_states.get(t.number) != TrialState.PAUSED]
        for t in pausing:
            t.state = TrialState.RUNNING
        try:
            yield
        finally:
            for t in pausing:
                if t.state == TrialState.RUNNING:
                    t.state = TrialState.PAUSED


def _merge(mine: Trial | None, r: Trial) -> Trial:
    """The API's record r, with what this service holds of the same attempt that is not written back yet."""
    if mine is not None and not r.params:
        r.params = mine.params  # a Trial deleted by hand: the operator sends its number alone, as Killed
    if mine is None or mine.attempt != r.attempt:
        return r
    if len(mine.intermediate) > len(r.intermediate):
        r.intermediate = mine.intermediate
        r.metrics = {**r.metrics, **mine.metrics}
    if len(mine.events) > len(r.events):
        r.events, r.params = mine.events, mine.params  # a PBT exploit (or a pause) not written back yet
    if (mine.state in (TrialState.PRUNED, TrialState.PAUSED) and r.state.active
            and resumes(r.events) <= resumes(mine.events)):
        # Pruned or paused here, its pod not gone yet (or not yet seen running): its later reports are
        # answered so, never applied. (Unless the API holds a resume this service did not make: one
        # that a service before a restart made, and the operator carried out.)
        r.state, r.reason = mine.state, mine.reason
    return r


class Brains:
    """Every experiment's Brain, created on first use and rebuilt when its spec changes."""

    def __init__(self, on_new: Callable[[Brain], None] | None = None):
        self._brains: dict[str, Brain] = {}
        self._lock = threading.Lock()
        self._on_new = on_new

    def get(self, key: str) -> Brain | None:
        return self._brains.get(key)

    def ensure(self, key: str, uid: str, document: Mapping[str, Any], seed: int, prior: list) -> Brain:
        spec = ExperimentSpec.from_document(document)
        fingerprint = spec.search_fingerprint()
        with self._lock:
            brain = self._brains.get(key)
            if not uid and brain is not None:
                uid = brain.uid  # a request without one (an operator before uids keyed the bus): the same experiment
            if brain is not None and brain.uid == uid and brain.fingerprint == fingerprint:
                return brain
            study = Study(parameters=spec.parameters, algorithm=spec.algorithm, goal=spec.objective.goal,
                          early_stopping=spec.early_stopping, prior=prior, seed=seed)
            brain = Brain(key, uid, fingerprint, study, spec.objective.metric)
            self._brains[key] = brain
        if self._on_new is not None:
            self._on_new(brain)
        return brain

    def drop(self, key: str) -> Brain | None:
        with self._lock:
            return self._brains.pop(key, None)

    def all(self) -> list[Brain]:
        return list(self._brains.values())
