"""A trial: one configuration of the search space, run once, and what came of it."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping


class TrialState(str, enum.Enum):
    PENDING = "Pending"      # asked for, not started yet
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # finished with an objective value
    FAILED = "Failed"        # crashed, timed out, or reported no usable objective
    PRUNED = "Pruned"        # stopped early by the scheduler
    KILLED = "Killed"        # stopped from outside (Ctrl-C, experiment ended)
    # Stopped at a rung with its checkpoint kept (promotion ASHA, synchronous
    # HyperBand); the scheduler may resume it later. Neither active nor finished.
    PAUSED = "Paused"

    @property
    def finished(self) -> bool:
        return self in (TrialState.SUCCEEDED, TrialState.FAILED, TrialState.PRUNED, TrialState.KILLED)

    @property
    def active(self) -> bool:
        return self in (TrialState.PENDING, TrialState.RUNNING)


EXPLOITS = ("exploit", "exploit-unused")  # events that refer to the trial's reports by index


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    state: TrialState = TrialState.PENDING
    value: float | None = None  # the objective, once known
    # The objective's intermediate values, [step, value] in report order.
    intermediate: list[list[float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each metric
    reason: str = ""
    attempt: int = 1
    started_at: float | None = None
    finished_at: float | None = None
    name: str = ""
    # What the scheduler did to this trial, oldest first: {"event": "assign" |
    # "pause" | "resume" | "exploit" | "exploit-unused", ...}. Kept with the trial in the state
    # store so that a restarted scheduler rebuilds its state from the trials.
    events: list[dict] = field(default_factory=list)

    @property
    def budget(self) -> float | None:
        """How far (in the scheduler's resource) this run of the trial should go; None: to the end."""
        for e in reversed(self.events):
            if e.get("event") in ("assign", "resume"):
                return e.get("budget")
        return None

    @property
    def resumed_from(self) -> float | None:
        """The step this run of a paused trial resumes after (its checkpoint's); None for a first run."""
        for e in reversed(self.events):
            if e.get("event") in ("assign", "resume"):
                return e.get("from_step") if e["event"] == "resume" else None
        return None

    @property
    def exploit_on_latest(self) -> dict | None:
        """The exploit event decided on the latest report (recorded, not yet followed by a report)."""
        e = self.events[-1] if self.events else None
        return e if e and e.get("event") == "exploit" and e.get("report") == len(self.intermediate) else None

    def undo_unreported_exploit(self) -> bool:
        """For a trial whose process is gone: an exploit decided on its latest report was never
        followed by a report (a trainer at its last step has nothing left to train), so none of
        its recorded values came from the new parameters. It keeps its old parameters, and the
        event stays as "exploit-unused", out of its lineage. True when there was one."""
        e = self.exploit_on_latest
        if e is None:
            return False
        e["event"] = "exploit-unused"
        self.params = dict(e["old"])
        return True

    def start_over(self, attempt: int | None = None) -> None:
        """Makes the trial a new attempt (the next one by default) that runs from the start (an
        interruption or a lost pod cut the last one short): what it reported goes, and with it PBT's
        exploits, whose report indices point into that list. It keeps its current parameters, which
        the new attempt runs with, and its assignments (bracket, budget)."""
        self.state, self.attempt = TrialState.PENDING, self.attempt + 1 if attempt is None else attempt
        self.intermediate, self.metrics, self.value, self.reason = [], {}, None, ""
        self.started_at = self.finished_at = None
        self.events = [e for e in self.events if e.get("event") not in EXPLOITS]

    @property
    def last_step(self) -> float | None:
        return self.intermediate[-1][0] if self.intermediate else None

    def to_dict(self) -> dict:
        # Written out, not dataclasses.asdict: the operator sends every trial of an experiment at once,
        # and asdict's generic deep copy was most of that cost.
        return {"number": self.number, "params": dict(self.params), "state": self.state.value, "value": self.value,
                "intermediate": [list(p) for p in self.intermediate], "metrics": dict(self.metrics),
                "reason": self.reason, "attempt": self.attempt, "started_at": self.started_at,
                "finished_at": self.finished_at, "name": self.name, "events": [dict(e) for e in self.events]}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        d = dict(d)
        d["state"] = TrialState(d["state"])
        return cls(**d)


def resumes(events: list[dict]) -> int:
    """How many times a trial was resumed after a pause (its runs after the first of its attempt)."""
    return sum(1 for e in events if e.get("event") == "resume")


def paused_reason(trial: Trial) -> str:
    """Why a paused trial waits, from its latest pause."""
    step = next((e.get("step") for e in reversed(trial.events) if e.get("event") == "pause"), None)
    return "paused, waiting for promotion" if step is None else f"paused at step {step:g}, waiting for promotion"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_of(trials, goal: str) -> "Trial | None":
    """The succeeded trial with the best value (the earliest of equals)."""
    done = [t for t in trials if t.state == TrialState.SUCCEEDED and finite(t.value)]
    if not done:
        return None
    sign = -1.0 if goal == "maximize" else 1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


@dataclass(frozen=True)
class Decision:
    """What a scheduler answers to a reported metric; `report()` hands it to the trial."""

    # continue | stop | exploit | pause (save a checkpoint and exit; the
    # scheduler may resume the trial later from that checkpoint) | wait (synchronous
    # PBT: the decision on this report comes later, once the rest of the population
    # has reported this step; Study.released() hands it out. The trial SDK never
    # returns it: report() blocks until the real decision arrives.)
    action: str = "continue"
    reason: str = ""
    # exploit (PBT): continue from the donor trial's checkpoint with new parameters.
    donor: int | None = None
    params: dict[str, Any] | None = None
    # exploit: the donor's step the decision was made at; its checkpoint from then is the one to take
    # (the donor may have saved newer ones by the time it is copied).
    donor_step: float | None = None

    @property
    def stop(self) -> bool:
        return self.action == "stop"

    @property
    def pause(self) -> bool:
        """Save a checkpoint and exit; the scheduler may resume this trial from it later."""
        return self.action == "pause"

    @property
    def wait(self) -> bool:
        """The decision on this report is held back until the population catches up."""
        return self.action == "wait"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Decision":
        """A decision as sent over the wire. Fields this version does not know are ignored: trial
        images outlive scheduler versions, and a newer scheduler's extra detail (a field that a
        later version adds) must not crash an older trial's report()."""
        return cls(**{k: v for k, v in d.items() if k in _DECISION_FIELDS})


_DECISION_FIELDS = frozenset(f.name for f in fields(Decision))
CONTINUE = Decision()


_STEP_KEYS = ("step", "epoch", "iteration", "iter")


def step_from(metrics: Mapping[str, float], trial: Trial) -> float:
    """The step of a report that named none: a step-like metric, else the report's ordinal. The same
    locally and over the bus, and a report read again (the bus delivers at least once) gets the same."""
    for key in _STEP_KEYS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return float(len(trial.intermediate) + 1)
