"""Successive halving and HyperBand (Jamieson & Talwalkar 2016; Li et al., JMLR 2018).

synchronous (default), as in the papers: a bracket takes n configurations at
its first rung; each trial pauses at a rung; once every trial of the rung has
a value there (or has finished), the top 1/eta resume from their checkpoints
(never from scratch) and the others are pruned. While a bracket's rung is not
complete a free worker is never idle: it starts the next bracket.

asynchronous: the same brackets run as ASHA's stopping form (no checkpoints,
no waiting) -- what Optuna's HyperbandPruner does.

`sha` is one bracket kind (starting at min), repeated; `hyperband` cycles
through every bracket, most aggressive first.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..api.trial import CONTINUE, Decision, Trial, TrialState
from .asha import ASHA
from .base import Assignment
from .rungs import RungScheduler, rung_settings


_CANNOT_GO_ON = (TrialState.FAILED, TrialState.KILLED)


class HyperBand(RungScheduler):
    name = "hyperband"
    SETTINGS = rung_settings("synchronous", ("synchronous", "asynchronous"))

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kinds = self.bracket_kinds()
        self._async = None
        if self.mode == "asynchronous":
            settings = {**self.settings, "mode": "stopping", "brackets": len(self.kinds)}
            self._async = ASHA(goal=self.goal, space=self.space, seed=self.seed, settings=settings)
        self.needs_checkpoints = self.pauses = self._async is None

    def bracket_kinds(self) -> list[int]:
        """Which ladder (first rung index) each bracket in turn uses."""
        return list(range(self.s_max + 1))

    def size(self, kind: int) -> int:
        return self.bracket_sizes(self.s_max + 1)[kind]

    # Brackets are numbered in the order they open; trial -> bracket is in its events.
    def bracket_of(self, trial: Trial) -> int:
        for e in trial.events:
            if e.get("event") == "assign" and e.get("bracket") is not None:
                return int(e["bracket"])
        return -1

    def milestones(self, bracket: int) -> list[float]:
        return self.ladder(0 if bracket < 0 else self.kinds[bracket % len(self.kinds)])

    def on_report(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        if self._async is not None:
            return self._async.on_report(trial, step, value, trials)
        self.sync(trials, holdback=trial)
        crossed = self._ingest(trial, len(trial.intermediate))
        ms = self.milestones(self.bracket_of(trial))
        # A report that reached max (a jump past the last rungs included) finishes: nothing to resume it to.
        if crossed and crossed[-1] < len(ms) - 1 and self.bracket_of(trial) >= 0:
            k = crossed[0]
            return Decision("pause", f"paused at rung {k} ({self.settings['resource']} {ms[k]:g}) until "
                            "every trial of its bracket has reached it")
        return CONTINUE

    def on_ask(self, trials: Sequence[Trial], new_allowed: bool = True) -> Assignment | None:
        if self._async is not None:
            return self._async.on_ask(trials, new_allowed)
        self.sync(trials)
        groups: dict[int, list[Trial]] = {}
        for t in trials:
            b = self.bracket_of(t)
            if b >= 0:
                groups.setdefault(b, []).append(t)
        prune: list[int] = []
        resume = None
        for b in sorted(groups):
            found = self._walk(b, groups[b], trials, new_allowed, prune)
            if resume is None and found is not None:
                resume = found
        if resume is not None:
            n, budget = resume
            return Assignment(resume=n, budget=budget, prune=tuple(prune))
        if not new_allowed:
            return Assignment(prune=tuple(prune)) if prune else None
        open_ = [b for b in sorted(groups) if len(groups[b]) < self.size(self.kinds[b % len(self.kinds)])]
        b = open_[0] if open_ else (max(groups) + 1 if groups else 0)
        return Assignment(bracket=b, budget=self.milestones(b)[0], prune=tuple(prune))

    def _walk(self, b, members, trials, new_allowed, prune) -> tuple[int, float] | None:
        """Goes up bracket b's complete rungs; collects losers to prune and the first winner to resume."""
        ms = self.milestones(b)
        if len(members) < self.size(self.kinds[b % len(self.kinds)]) and new_allowed:
            return None  # the first rung is still filling
        found = None
        in_rung = members
        for k in range(len(ms) - 1):
            rec = self.rung(b, k)
            if not all(t.number in rec or t.state.finished for t in in_rung):
                break
            # A trial that failed or was killed after reporting here cannot go on: its place goes to the next.
            ranked = sorted((t.number for t in in_rung if t.number in rec and t.state not in _CANNOT_GO_ON),
                            key=lambda n: (rec[n], n))
            winners = ranked[: max(1, math.floor(len(in_rung) / self.eta))]
            # A report that jumped past several rungs pauses a trial above rung k: it still lost here.
            paused = [t.number for t in in_rung if t.state == TrialState.PAUSED and self.top_rung(t) >= k]
            prune.extend(n for n in paused if n not in winners)
            waiting = [n for n in paused if self.top_rung(trials[n]) == k]
            if found is None:  # the best waiting winner first
                found = next(((n, ms[k + 1]) for n in winners if n in waiting), None)
            in_rung = [trials[n] for n in winners]
        return found

    def observations(self, trials):
        return self._async.observations(trials) if self._async else super().observations(trials)


class SuccessiveHalving(HyperBand):
    """Successive halving: one HyperBand bracket kind, from the smallest resource up (eta**s_max configurations)."""

    name = "sha"

    def bracket_kinds(self) -> list[int]:
        return [0]

    def size(self, kind: int) -> int:
        return round(self.eta ** (self.s_max - kind))


class BOHB(HyperBand):
    """HyperBand whose new configurations come from the Study's sampler.

    BOHB (Falkner et al., ICML 2018) = these brackets + a model proposing
    configurations. The model is the sampler (`algorithm: {name: bohb}`): it
    gets this scheduler through `attach_scheduler()` and reads
    `observations(trials)`, the (params, loss) pairs at each budget, to fit its
    KDE on the largest budget with enough points. With another sampler this is
    HyperBand with that sampler's configurations.
    """

    name = "bohb"
