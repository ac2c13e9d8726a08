"""Rungs over a resource: what SHA, HyperBand, ASHA and BOHB share.

A bracket s starts its trials at `min * eta**s` and has rungs at each further
power of eta, the last one at `max`. A trial's value at a rung is the first
finite value it reported at a step at or past the rung's milestone.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..api.settings import Setting, at_least, positive
from ..api.trial import Trial
from ..api.validation import Problem
from .base import Scheduler, setting_problem

_EPS = 1e-9
_START = (0, 0)  # (entries ingested, next rung) of a trial not seen yet


def rung_settings(mode_default: str, modes: tuple) -> dict[str, Setting]:
    return {
        "resource": Setting(str, "epoch", "name of the resource the steps count (epoch, step, seconds, ...)"),
        "min": Setting(float, 1, "smallest resource a trial gets before it can be stopped", positive),
        "max": Setting(float, None, "the resource of a full trial", positive),
        "reductionFactor": Setting(float, 3, "eta: 1/eta of the trials at a rung go on to the next", at_least(2)),
        "mode": Setting(str, mode_default, "stopping: stop losers as they report; promotion/synchronous: "
                        "pause trials at rungs and resume winners from their checkpoints", choices=modes),
    }


class RungScheduler(Scheduler):
    SETTINGS = rung_settings("stopping", ("stopping",))

    def __init__(self, **kw):
        super().__init__(**kw)
        s = self.settings
        self.min = float(s["min"])
        self.max = float(s["max"])
        self.eta = float(s["reductionFactor"])
        self.mode = s["mode"]
        self.s_max = len(self.ladder(0)) - 1
        # trial number -> (entries ingested, next rung index); bracket -> rung -> {trial: loss}
        self._seen: dict[int, tuple[int, int]] = {}
        self._recs: dict[int, list[dict[int, float]]] = {}
        self._thresholds: dict[int, list[float]] = {}  # bracket -> the steps that reach its rungs
        self._synced = -1  # length of the trial list at the last full scan
        self._attempts: dict[int, int] = {}  # trial number -> the attempt its records come from (if not 1)

    @classmethod
    def check(cls, settings, spec, path) -> list[Problem]:
        problems = super().check(settings, spec, path)
        if problems:
            return problems
        s = dict(settings or {})
        if s.get("max") is None:
            return [setting_problem(path, "max", "required: the resource of a full trial (e.g. the number of epochs)")]
        lo = s.get("min", cls.SETTINGS["min"].default)
        if s["max"] <= lo:
            return [setting_problem(path, "max", f"must be greater than min ({lo}); got {s['max']}")]
        eta = s.get("reductionFactor", cls.SETTINGS["reductionFactor"].default)
        if s["max"] < lo * eta:
            return [setting_problem(path, "max", f"max/min = {s['max'] / lo:g} is below reductionFactor {eta}: "
                                    "there is only one rung, so nothing would ever be stopped")]
        return []

    # -- the ladder ----------------------------------------------------------

    def milestones(self, bracket: int) -> list[float]:
        """The rungs of a bracket (by default bracket b starts at rung b)."""
        return self.ladder(bracket)

    def ladder(self, first: int) -> list[float]:
        """Rung milestones from min * eta**first up to max."""
        cache = self.__dict__.setdefault("_ladders", {})
        if first not in cache:
            cache[first] = self._ladder(first)
        return cache[first]

    def _ladder(self, first: int) -> list[float]:
        out, k = [], first
        while True:
            r = self.min * self.eta**k
            if r >= self.max * (1 - _EPS):
                break
            out.append(r)
            k += 1
        return out + [self.max]

    def bracket_sizes(self, n_brackets: int) -> list[int]:
        """HyperBand's number of configurations per bracket (used as weights too)."""
        top = self.s_max
        return [math.ceil((top + 1) / (top - s + 1) * self.eta ** (top - s)) for s in range(n_brackets)]

    # -- rung records, rebuilt from the trials -------------------------------

    def bracket_of(self, trial: Trial) -> int:
        return 0

    def sync(self, trials: Sequence[Trial], holdback: Trial | None = None) -> None:
        """Records every reported value not seen yet (all but the last of `holdback`).

        Every report reaches the scheduler through on_report, so once the trial list
        was read (after a restart: on the first call) only a reporting trial can hold
        values not seen yet; the full scan runs again only when trials were added.
        """
        if holdback is not None and len(trials) == self._synced:
            if holdback.attempt != self._attempts.get(holdback.number, 1):
                self._forget(holdback)
            n = len(holdback.intermediate) - 1
            if n > self._seen.get(holdback.number, _START)[0]:
                self._ingest(holdback, n)
            return
        self._synced = len(trials)
        for t in trials:
            if t.attempt != self._attempts.get(t.number, 1):
                self._forget(t)
            n = len(t.intermediate) - (1 if t is holdback else 0)
            if n > self._seen.get(t.number, _START)[0]:
                self._ingest(t, n)

    def _forget(self, trial: Trial) -> None:
        """A trial run again as a new attempt (its pod was lost) starts with no reports: the values of
        the attempt before leave its rungs, as they are absent from the trials a rebuilt scheduler reads."""
        self._attempts[trial.number] = trial.attempt
        if self._seen.pop(trial.number, None) is not None:
            for rec in self._recs.get(self.bracket_of(trial), ()):
                rec.pop(trial.number, None)

    def _ingest(self, trial: Trial, upto: int) -> Sequence[int]:
        """Records trial's entries up to index `upto`; returns the rungs newly crossed.
        Runs once per report: most reports cross no rung, and cost one comparison here."""
        b = self.bracket_of(trial)
        th = self._thresholds.get(b)
        if th is None:
            th = self._thresholds[b] = [m * (1 - _EPS) for m in self.milestones(b)]
        recs = self._recs.get(b)
        if recs is None:  # made on a bracket's first ingest, as always: observations() follows this order
            recs = self._recs[b] = [{} for _ in th]
        number = trial.number
        done, k = self._seen.get(number, _START)
        crossed: Sequence[int] = ()
        if k < len(th):
            for step, value in trial.intermediate[done:upto]:
                # Non-finite values never reach on_report (the Study skips them); ranked at a rung,
                # a NaN would make its cutoff meaningless. The next finite value stands for the trial.
                if step < th[k] or not math.isfinite(value):
                    continue
                crossed = list(crossed)
                while k < len(th) and step >= th[k]:
                    recs[k][number] = self.loss(value)
                    crossed.append(k)
                    k += 1
                if k == len(th):
                    break
        self._seen[number] = (max(done, upto), k)
        return crossed

    def rung(self, bracket: int, k: int) -> dict[int, float]:
        recs = self._recs.get(bracket)
        return recs[k] if recs else {}

    def top_rung(self, trial: Trial) -> int:
        """Highest rung index the trial has a value at (-1: none yet)."""
        return self._seen.get(trial.number, _START)[1] - 1

    def cutoff(self, rung: Mapping[int, float]) -> float:
        """The worst loss still in the top 1/eta of a rung's values (the trial's own included).

        Rank-based, as in the ASHA paper: with n values the best max(1, floor(n/eta))
        go on, so while fewer than eta trials are there only the best does.
        """
        ranked = sorted(rung.values())
        return ranked[max(1, int(len(ranked) // self.eta)) - 1]

    def promotable(self, bracket: int, k: int) -> list[int]:
        """The top floor(n/eta) trials of rung k (ties by number), best first."""
        rec = self.rung(bracket, k)
        ranked = sorted(rec, key=lambda n: (rec[n], n))
        return ranked[: int(len(ranked) // self.eta)]

    def observations(self, trials: Sequence[Trial]) -> dict[float, list[tuple[dict, float]]]:
        """(params, loss) at each budget, for a multi-fidelity model (BOHB's KDE)."""
        self.sync(trials)
        out: dict[float, list] = {}
        for b, recs in self._recs.items():
            for k, rec in enumerate(recs):
                m = self.milestones(b)[k]
                if rec:
                    out.setdefault(m, []).extend((trials[n].params, loss) for n, loss in rec.items())
        return dict(sorted(out.items()))


def describe(resource: str, value: float) -> str:
    return f"{resource} {value:g}"

