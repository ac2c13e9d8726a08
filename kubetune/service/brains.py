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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..api.spec import ExperimentSpec
from ..api.trial import Trial, TrialState
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

    @property
    def bus_key(self) -> str:
        """Its key on the metric bus, as its pods have it (KUBETUNE_BUS_KEY)."""
        namespace, name = self.key.split("/", 1)
        return experiment_key(namespace, name, self.uid)

    def sync(self, records: list[Trial]) -> None:
        """The API's records win for state; reported values kept here that the API lacks stay."""
        mine = {t.number: t for t in self.study.trials}
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
            if r.number < len(trials):
                trials[r.number] = _merge(trials[r.number], r)
            elif r.number == len(trials):
                trials.append(r)
            else:
                return False
        del trials[total:]  # asked for, not (yet) created: asked for again, identically
        self.dirty &= set(range(len(trials)))
        return True

    def suggest(self, count: int) -> tuple[list[dict], bool]:
        out = []
        try:
            for _ in range(count):
                t = self.study.ask()
                t.name = trial_name(self.key.split("/", 1)[1], t.number)
                out.append({"number": t.number, "params": t.params})
        except SearchExhausted:
            return out, True
        return out, False


def _merge(mine: Trial | None, r: Trial) -> Trial:
    """The API's record r, with what this service holds of the same attempt that is not written back yet."""
    if mine is not None and mine.attempt == r.attempt and len(mine.intermediate) > len(r.intermediate):
        r.intermediate = mine.intermediate
        r.metrics = {**r.metrics, **mine.metrics}
    if mine is not None and mine.attempt == r.attempt and len(mine.events) > len(r.events):
        r.events, r.params = mine.events, mine.params  # a PBT exploit not written back yet
        if mine.state == TrialState.PRUNED and r.state == TrialState.RUNNING:
            r.state, r.reason = mine.state, mine.reason  # pruned here, pod not gone yet
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
