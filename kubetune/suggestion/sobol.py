"""Quasi-random search: a scrambled Sobol sequence covers the space more evenly than random draws."""

from __future__ import annotations

from scipy.stats import qmc

from .base import Sampler


class SobolSampler(Sampler):
    name = "sobol"

    def ask(self, trials):
        # The n-th point of one seeded sequence: a restarted sampler continues it exactly.
        engine = qmc.Sobol(d=len(self.space), scramble=True, seed=self.seed)
        if trials:
            engine.fast_forward(len(trials))
        points = (self.space.from_unit(engine.random(1)[0]) for _ in range(64))
        return self.first_unseen(points, trials)
