"""Population-Based Training (Jaderberg et al. 2017): asynchronous, or in generations with `synch`.

Every `perturbationInterval` steps (after `burnIn`), a trial compares its
value with the other live trials' values at the same step (their most recent
one at or before it: a trial that started later is not worse for being younger). In the
bottom `quantileFraction` it exploits: it continues from the checkpoint of a
random trial of the top quantile (the donor) with the donor's parameters,
explored: each numeric value multiplied by 0.8 or 1.2 (on a log scale that is
its natural step; bounds kept, ints rounded), each categorical moved to a
neighbouring value, or any value resampled with `resampleProbability`. Donors at
most an interval ahead are preferred (a checkpoint far ahead ages the taker's
model at once). The Study applies the new parameters to the trial and
records the exploit in the trial's events; `lineage()` reads them.

With `synch: true` (Ray Tune's `synch=True`) the population moves in
generations: a trial's decision at a check waits (answered `wait`) until every
other live trial (pending or running) has reported that step or finished, and
is then made on every member's value at that step, with donors' checkpoints
from that step. That is PBT as the paper runs it; the asynchronous default
never holds a trial back, but members that start at different times (pods
scheduled minutes apart, processes seconds apart next to millisecond epochs)
are then compared, and take donors, at different points of training. Held
decisions live in memory: a rebuilt scheduler holds nothing, so a waiting trial
sends its report again and the rebuilt scheduler judges it as the first did
(`on_resent`: the same ranking at that step, the same seeded draws); a trial
whose runtime gave up waiting (and answered `continue`) simply reports again.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..api.settings import Setting, at_least, fraction, positive
from ..api.space import Parameter
from ..api.trial import CONTINUE, Decision, Trial
from ..api.validation import Problem
from .base import Scheduler, setting_problem


class PBT(Scheduler):
    name = "pbt"
    needs_checkpoints = True
    SETTINGS = {
        "resource": Setting(str, "step", "name of what the steps count"),
        "perturbationInterval": Setting(float, 5, "steps between a trial's exploit/explore checks", positive),
        "burnIn": Setting(float, 0, "no exploit before this step", at_least(0)),
        "quantileFraction": Setting(float, 0.25, "bottom fraction that exploits the top fraction (at most 0.5)",
                                    lambda v: None if 0 < v <= 0.5 else f"must be in (0, 0.5]; got {v!r}"),
        "resampleProbability": Setting(float, 0.25, "chance that explore resamples a value instead of perturbing it",
                                       fraction),
        "perturbationFactors": Setting(list, [0.8, 1.2], "factors a numeric value is multiplied by"),
        "synch": Setting(bool, False, "synchronous generations: a trial's decision at a check waits until "
                                      "every other live trial has reported that step (or finished)"),
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        # trial number -> (entries seen, step of its last check); rebuilt from intermediates and events.
        self._last: dict[int, tuple[int, float]] = {}
        # synch: trial number -> (its reports then, step, value) of a check answered `wait`.
        self._held: dict[int, tuple[int, float, float]] = {}
        self._gone: set[int] = set()  # processes ended, final states not known yet (on_ended)
        # trial number -> its reports when it last reported, or asked again, here: a member whose latest
        # report came before a restart has not asked again yet (see _behind).
        self._asked: dict[int, int] = {}

    @classmethod
    def check(cls, settings, spec, path):
        problems = super().check(settings, spec, path)
        factors = (settings or {}).get("perturbationFactors")
        if not problems and factors is not None:
            if not factors or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0
                                      for f in factors):
                problems.append(setting_problem(path, "perturbationFactors",
                                                f"expected a non-empty list of positive numbers; got {factors!r}"))
        parallel = ((spec or {}).get("budget") or {}).get("parallelTrials")
        if parallel is not None and parallel < 2:
            where = f"{path.rsplit('.', 1)[0]}.budget.parallelTrials" if "." in path else "budget.parallelTrials"
            problems.append(Problem(where, "PBT needs a population of at least 2 trials "
                                    f"running side by side; got {parallel}"))
        return problems

    # -- when a trial is checked --------------------------------------------

    def _last_check(self, trial: Trial, upto: int) -> float:
        """Step of the trial's last check as report `upto` sees it, replayed from its history.

        After an exploit the trial goes on from the donor's checkpoint, and trainers
        number the steps after it one of two ways: on from their own counter (e.g.
        tests/trials/pbt_toy.py) or on from the donor checkpoint's step (the example
        trainer digits_torch.py; Ray Tune's way). The first report after the exploit tells which:
        the interval restarts at whichever of the two steps it continues (the larger one
        below it), so either way the new parameters train a full interval before the
        trial is judged again.
        """
        seen, last = self._last.get(trial.number, (0, 0.0))
        if seen > upto:
            seen, last = 0, 0.0
        exploits = {e["report"]: e for e in trial.events if e.get("event") == "exploit"}
        interval, burn = self.settings["perturbationInterval"], self.settings["burnIn"]
        for i in range(seen, min(upto + 1, len(trial.intermediate))):
            step = trial.intermediate[i][0]
            if i in exploits:  # the first report after an exploit
                e = exploits[i]
                below = [b for b in (e.get("step"), e.get("donor_step")) if b is not None and b < step]
                last = max(below) if below else step
            if i < upto and step >= burn and step - last >= interval:
                last = step
        self._last[trial.number] = (upto, last)
        return last

    def on_report(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        s = self.settings
        # A newer report: a decision held for this trial was given up on by its runtime.
        self._held.pop(trial.number, None)
        self._gone.discard(trial.number)  # running again (a new attempt)
        self._asked[trial.number] = len(trial.intermediate)
        # The cache stops before this report: an exploit decided now is recorded after it.
        last = self._last_check(trial, len(trial.intermediate) - 1)
        if step < s["burnIn"] or step - last < s["perturbationInterval"]:
            return CONTINUE
        if s["synch"]:
            behind = self._behind(trial, step, trials)
            if behind:
                self._held[trial.number] = (len(trial.intermediate), step, value)
                shown = ", ".join(map(str, behind[:5])) + (", ..." if len(behind) > 5 else "")
                return Decision("wait", f"synch: waits for trial{'s' if len(behind) > 1 else ''} {shown} "
                                        f"to report {s['resource']} {step:g}")
        return self.decide(trial, step, value, trials)

    def on_resent(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision | None:
        n = len(trial.intermediate)
        if not self.settings["synch"] or self._asked.get(trial.number) == n:
            return None  # its answer went out from here, or is held here
        if trial.exploit_on_latest:
            self._asked[trial.number] = n
            return None  # decided and recorded before the restart: the Study hands that out again
        return self.on_report(trial, step, value, trials)

    def released(self, trials: Sequence[Trial]) -> list[tuple[int, Decision]]:
        out = []
        for number, (reports, step, value) in sorted(self._held.items()):
            trial = trials[number]
            if not trial.state.active or number in self._gone or len(trial.intermediate) != reports:
                del self._held[number]  # gone, or it went on without the answer
            elif not self._behind(trial, step, trials):
                del self._held[number]
                out.append((number, self.decide(trial, step, value, trials)))
        return out

    def on_ended(self, trial: Trial) -> None:
        self._gone.add(trial.number)

    def _behind(self, trial: Trial, step: float, trials: Sequence[Trial]) -> list[int]:
        """The other live trials (pending or running) that have not reported `step` yet, or reported it
        to a scheduler that has since restarted and have not asked again for their answer: a generation
        is decided together, before any donor trains on past the step its checkpoint is taken at."""
        return [t.number for t in trials if t is not trial and t.state.active and t.number not in self._gone
                and (not t.intermediate or t.intermediate[-1][0] < step
                     or (t.intermediate[-1][0] == step and self._asked.get(t.number) != len(t.intermediate)))]

    def decide(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        """The decision at a check: continue, or exploit a top trial (the bottom quantile)."""
        s = self.settings
        interval = s["perturbationInterval"]
        # Members are compared at this step, not at whatever step each has reached: a trial
        # started later (a pod scheduled minutes after the others) is not "worse" for being
        # younger. A member ahead counts with the value it had at this step; one behind with
        # its latest (it will be compared fairly when it gets here).
        at = {t.number: self._value_at(t, step) for t in trials
              if t.intermediate and not t.state.finished and t.number not in self._gone and t is not trial}
        at = {n: v for n, v in at.items() if v is not None}
        at[trial.number] = value
        if len(at) < 2:
            return CONTINUE
        ranked = sorted(at, key=lambda n: (self.loss(at[n]), n))
        q = max(1, min(math.ceil(len(ranked) * s["quantileFraction"]), len(ranked) // 2))
        top, bottom = ranked[:q], ranked[-q:]
        if trial.number not in bottom:
            return CONTINUE
        # A donor hands over its latest checkpoint: one far ahead makes this trial's model
        # that much older at once (or hands over a finished one). Donors at most an interval
        # ahead are preferred.
        top = [trials[n] for n in top]
        near = [t for t in top if t.intermediate[-1][0] <= step + interval]
        top = near or top
        rng = self.rng(2, trial.number, len(trial.intermediate))
        donor = top[int(rng.integers(len(top)))]
        params = self.explore(donor.params, rng)
        return Decision("exploit", f"bottom {s['quantileFraction']:g} at {s['resource']} {step:g}: "
                        f"continues from trial {donor.number}'s checkpoint with explored parameters",
                        donor=donor.number, params=params, donor_step=donor.last_step)

    @staticmethod
    def _value_at(trial: Trial, step: float) -> float | None:
        """The trial's most recent value reported at a step at or before `step`."""
        for st, v in reversed(trial.intermediate):
            if st <= step:
                return v
        return None

    # -- explore -------------------------------------------------------------

    def explore(self, params: Mapping[str, Any], rng: np.random.Generator) -> dict:
        out: dict[str, Any] = {}
        for p in self.space.params:
            if not self.space.is_active(p, out):
                continue
            if p.name not in params or rng.random() < self.settings["resampleProbability"]:
                out[p.name] = p.from_unit(rng.random())
            else:
                out[p.name] = self._perturb(p, params[p.name], rng)
        return self.space.canonical(out)

    def _perturb(self, p: Parameter, value, rng: np.random.Generator):
        """A neighbour of value: it always differs from value when the range allows it (a
        step that the bounds clip away is taken the other way instead)."""
        if p.is_choice:
            i = p.index(value)
            first = 1 if rng.random() < 0.5 else -1
            for d in (first, -first):
                if 0 <= i + d < len(p.values):
                    return p.values[i + d]
            return value
        factors = [float(f) for f in self.settings["perturbationFactors"]]
        first = int(rng.integers(len(factors)))
        for f in [factors[first]] + [g for j, g in enumerate(factors) if j != first]:
            new = self._scale(p, value, f)
            if new != value:
                return new
        return value

    def _scale(self, p: Parameter, value, f: float):
        if p.log or p.low > 0:
            new = value * f
        else:  # a range reaching 0 or below: a multiplicative step could stall at 0; step by range
            new = value + (f - 1) * 0.5 * (p.high - p.low)
        new = p.snap(new)
        if p.type == "int" and new == value and f != 1:
            new = p.snap(value + (1 if f > 1 else -1) * (p.step or 1))
        return new
