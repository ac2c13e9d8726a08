"""ASHA: asynchronous successive halving (Li et al., MLSys 2020).

No worker ever waits for a rung to fill. Two forms:

- stopping (default): a trial reaching a rung stops unless its value is in the
  top 1/eta of the values recorded there so far, its own included (while
  fewer than eta are there, only the best goes on). Needs no checkpoints.
- promotion (the paper's Algorithm 2): a trial pauses at each rung; when a
  worker is free, the best paused trial that is in the top 1/eta of its rung
  resumes from its checkpoint, else a new configuration starts.

`brackets` > 1 runs several brackets side by side (asynchronous HyperBand);
each trial draws its bracket with HyperBand's weights, from the seed and its
number only.
"""

from __future__ import annotations

from typing import Sequence

from ..api.settings import Setting, at_least
from ..api.trial import CONTINUE, Decision, Trial, TrialState
from .base import Assignment, setting_problem
from .rungs import RungScheduler, rung_settings


class ASHA(RungScheduler):
    name = "asha"
    SETTINGS = {
        **rung_settings("stopping", ("stopping", "promotion")),
        "brackets": Setting(int, 1, "how many brackets run side by side (1: plain ASHA)", at_least(1)),
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        self.n_brackets = min(int(self.settings["brackets"]), self.s_max + 1)
        self.needs_checkpoints = self.pauses = self.mode == "promotion"
        weights = self.bracket_sizes(self.n_brackets)
        self._weights = [w / sum(weights) for w in weights]

    @classmethod
    def check(cls, settings, spec, path):
        problems = super().check(settings, spec, path)
        if problems or not settings or "brackets" not in settings:
            return problems
        s = {**{k: v.default for k, v in cls.SETTINGS.items()}, **settings}
        probe = cls(goal="minimize", space=None, seed=0, settings=s)
        if s["brackets"] > probe.s_max + 1:
            return [setting_problem(path, "brackets", f"at most {probe.s_max + 1} with min={s['min']}, "
                                    f"max={s['max']}, reductionFactor={s['reductionFactor']}; got {s['brackets']}")]
        return []

    def bracket_of(self, trial: Trial) -> int:
        if self.n_brackets == 1:
            return 0
        for e in trial.events:
            if e.get("event") == "assign" and e.get("bracket") is not None:
                return int(e["bracket"])
        return self._draw_bracket(trial.number)

    def _draw_bracket(self, number: int) -> int:
        return int(self.rng(1, number).choice(self.n_brackets, p=self._weights))

    def on_report(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        self.sync(trials, holdback=trial)
        crossed = self._ingest(trial, len(trial.intermediate))
        if not crossed:
            return CONTINUE  # most reports
        b = self.bracket_of(trial)
        ms = self.milestones(b)
        resource = self.settings["resource"]
        for k in crossed:
            if k == len(ms) - 1:
                break  # at max: the trial finishes on its own
            if self.mode == "promotion":
                if crossed[-1] == len(ms) - 1:
                    break  # this report reached max too: no rung is left to resume it to
                return Decision("pause", f"paused at rung {k} ({resource} {ms[k]:g}); resumes if it ranks "
                                f"in the top 1/{self.eta:g} there")
            rung = self.rung(b, k)
            if self.loss(value) > self.cutoff(rung):
                return Decision("stop", f"not in the top 1/{self.eta:g} at {resource} {ms[k]:g} "
                                f"({len(rung)} trials there)")
        return CONTINUE

    def on_ask(self, trials: Sequence[Trial], new_allowed: bool = True) -> Assignment | None:
        if self.mode == "promotion":
            self.sync(trials)
            best = None  # (-rung, loss, number, bracket): higher rungs first
            for b in range(self.n_brackets):
                for k in range(len(self.milestones(b)) - 1):
                    rec = self.rung(b, k)
                    for n in self.promotable(b, k):
                        t = trials[n]
                        if t.state == TrialState.PAUSED and self.top_rung(t) == k:
                            cand = (-k, rec[n], n, b)
                            best = cand if best is None or cand < best else best
            if best is not None:
                k, _, n, b = -best[0], *best[1:]
                return Assignment(resume=n, budget=self.milestones(b)[k + 1])
        if not new_allowed:
            return None
        if self.n_brackets == 1 and self.mode == "stopping":
            return None
        b = self._draw_bracket(len(trials))
        first = self.milestones(b)[0]
        return Assignment(bracket=b, budget=first if self.mode == "promotion" else None)
