"""PB2: Population-Based Bandits (Parker-Holder et al., NeurIPS 2020).

PBT's exploit, with a model-based explore: a Gaussian process is fitted to how
much each trial improved over each interval, as a function of the step and of
the hyperparameters it trained with, and the trial that exploits gets the
hyperparameters with the highest upper confidence bound of improvement at the
current step (GP-UCB), instead of a random perturbation of the donor's.

- Data: for each trial and each stretch of `perturbationInterval` steps trained
  with one set of parameters, x = (step, parameters in the unit cube) and
  y = the improvement per step over that stretch (a gain whatever the goal).
- Model: the Matérn 5/2 ARD GP of the `gp` sampler (the step is one more input,
  so old observations weigh less for now, as PB2's time-varying kernel does).
- Acquisition: mean + kappa * sd over random candidates in the numeric
  parameters' box, plus the donor's parameters and their PBT neighbours.
  Parameters the GP does not model (categorical ones) are explored as by PBT.
- Until there are `minData` observations, explore is PBT's.

Like PBT it is pure logic over the trials' history: rebuilt after a restart, it
takes the same decisions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..api.settings import Setting, at_least, positive
from ..api.trial import Decision, Trial
from .pbt import PBT


class PB2(PBT):
    name = "pb2"
    SETTINGS = {
        **PBT.SETTINGS,
        "kappa": Setting(float, 2.0, "weight of the GP's standard deviation in the upper confidence bound",
                         at_least(0)),
        "minData": Setting(int, 6, "observations before the GP is used; until then explore is PBT's",
                           at_least(2)),
        "candidates": Setting(int, 512, "random candidates the acquisition is maximised over", positive),
    }

    def decide(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        d = super().decide(trial, step, value, trials)
        if d.action != "exploit":
            return d
        rng = self.rng(3, trial.number, len(trial.intermediate))
        params = self.suggest(trials[d.donor].params, step, trials, rng)
        if params is None:
            return d
        return Decision("exploit", d.reason.replace("explored parameters", "parameters chosen by the GP bandit"),
                        donor=d.donor, params=params, donor_step=d.donor_step)

    # -- the data ------------------------------------------------------------

    def numeric(self) -> list:
        return [p for p in self.space.params if not p.is_choice and not p.when]

    def observations(self, trials: Sequence[Trial]) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): x = [step, numeric parameters in [0, 1]], y = gain per step over an interval."""
        interval = self.settings["perturbationInterval"]
        num = self.numeric()
        xs, ys = [], []
        for t in trials:
            if not t.intermediate:
                continue
            exploits = {e["report"]: e for e in t.events if e.get("event") == "exploit"}
            first = t.events and next((e for e in t.events if e.get("event") == "exploit"), None)
            params = first["old"] if first else t.params
            anchor = 0  # report index the current stretch starts from
            for i in range(1, len(t.intermediate)):
                if i in exploits:  # report i is the first with the new parameters, from the donor's weights
                    params, anchor = exploits[i]["new"], i
                    continue
                (s0, v0), (s1, v1) = t.intermediate[anchor], t.intermediate[i]
                if s1 - s0 >= interval:
                    gain = -(self.loss(v1) - self.loss(v0)) / (s1 - s0)
                    if np.isfinite(gain):
                        xs.append([s1] + [p.to_unit(params[p.name]) for p in num if p.name in params])
                        ys.append(gain)
                    anchor = i
        width = 1 + len(num)
        rows = [(x, y) for x, y in zip(xs, ys) if len(x) == width]
        if not rows:
            return np.zeros((0, width)), np.zeros(0)
        return np.array([x for x, _ in rows], dtype=float), np.array([y for _, y in rows], dtype=float)

    # -- the bandit ------------------------------------------------------------

    def suggest(self, donor_params: Mapping[str, Any], step: float, trials: Sequence[Trial],
                rng: np.random.Generator) -> dict | None:
        from ..suggestion._gp import GP
        from ..suggestion.gp import standardise

        num = self.numeric()
        if not num:
            return None
        x, y = self.observations(trials)
        if len(y) < self.settings["minData"]:
            return None
        horizon = max(float(x[:, 0].max()), float(step), 1e-9)
        x = x.copy()
        x[:, 0] /= horizon
        gp = GP(x, standardise(y))
        # Candidates: random points of the box, the donor's parameters and PBT's neighbours of them.
        base = self.explore(donor_params, rng)  # also settles the parameters the GP does not model
        box = rng.random((self.settings["candidates"], len(num)))
        near = [donor_params, base] + [self.explore(donor_params, rng) for _ in range(8)]
        c = np.clip(np.vstack([box, [[p.to_unit(q[p.name]) for p in num] for q in near]]), 0.0, 1.0)
        now = np.full((len(c), 1), float(step) / horizon)
        mean, sd_ = gp.predict(np.hstack([now, c]))
        best = c[int(np.argmax(mean + self.settings["kappa"] * sd_))]
        out = dict(base)
        for p, u in zip(num, best):
            out[p.name] = p.from_unit(float(u))
        return self.space.canonical(out)
