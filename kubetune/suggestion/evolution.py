"""Regularised (aging) evolution (Real et al., AAAI 2019).

The population is the `populationSize` most recently finished trials; each ask
runs a tournament among `tournamentSize` of them drawn at random and mutates
the winner. Because the population ages out by trial order rather than by
fitness, a lucky early trial cannot dominate forever.

Mutation: each parameter changes with probability `mutationRate` (0.3; at least
one always does): an ordered one takes a Gaussian step on its unit scale (by
default as wide as the population's spread in that parameter, so steps shrink
as the population converges), a categorical one takes another value. Warm start: prior trials
seed the population, the best ones last so they age out last.
"""

from __future__ import annotations

import numpy as np

from ..api.settings import Setting, at_least, fraction, positive
from ._encoding import ModelSampler
from ._threads import small_linear_algebra
from .base import SEED


def column_spread(rows: np.ndarray, default: float) -> np.ndarray:
    """Standard deviation of each column over its non-NaN entries (`default` with fewer than two)."""
    ok = ~np.isnan(rows)
    count = ok.sum(axis=0)
    x = np.where(ok, rows, 0.0)
    mean = x.sum(axis=0) / np.maximum(count, 1)
    var = (np.where(ok, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
    return np.where(count >= 2, np.sqrt(var), default)


class EvolutionSampler(ModelSampler):
    name = "evolution"
    SETTINGS = {
        "seed": SEED,
        # 16 and 6, not 12 and 4 (bench.samplers, 20 seeds): better than random search in 23 of 24
        # cells, not 20 (SVM log-loss @50 0.0754, @100 0.0738 vs random 0.0768, 0.0750; SGD @200
        # 0.0280 vs 0.0320). Over seeds 0-39, 24 of 24 vs 23, and better than 12/4 in 16 cells,
        # worse in 2; on the SVM alone the two are within the tie tolerance of each other, so
        # the SVM verdicts at 20 seeds are partly seed luck. A population of 16 needs the larger
        # tournament to keep its selection pressure (6/16 vs 4/12): with 4 its median best on a
        # 3-D sphere after 40 trials was 0.66 x random search's (tests/test_samplers.py asks for
        # < 0.6; 0.26 with 6, 0.44 at 12/4).
        "populationSize": Setting(int, 16, "finished trials in the population (also the random start)", at_least(2)),
        "tournamentSize": Setting(int, 6, "population members drawn per tournament", at_least(1)),
        # 0.3, not the textbook 1/d: changing one parameter at a time stalled in 10-D (Ackley-10d
        # after 200 trials, 10 seeds: 17.5 at 1/d, no better than random search; 12.9 at 0.3).
        "mutationRate": Setting(float, 0.3, "probability each parameter mutates (at least one always does)", fraction),
        "mutationScale": Setting(float, None, "standard deviation of a step on the unit scale "
                                 "(default: the population's own spread, so steps shrink as it converges)", positive),
    }

    @small_linear_algebra
    def ask(self, trials):
        rng = self.rng(trials)
        s = self.settings
        hist = self.history(trials)
        n_prior = hist.n_prior
        # Prior trials oldest-first by decreasing loss, so the best are the last to age out.
        prior_order = np.argsort(-hist.loss[:n_prior], kind="stable")
        order = np.concatenate([prior_order, np.arange(n_prior, len(hist))]).astype(int)
        size = s["populationSize"]
        if len(order) < size:
            return self.first_unseen((self.space.sample(rng) for _ in range(64)), trials)
        population = order[-size:]
        scale = self.settings["mutationScale"]
        if scale is None:
            scale = np.clip(column_spread(hist.rows[population], default=0.1), 0.02, 0.15)
        scale = np.broadcast_to(scale, (self.encoder.dim,))
        children = [self._mutate(rng, hist.rows[self._tournament(rng, population, hist.loss)], scale)
                    for _ in range(16)]
        return self.pick_unseen(np.array(children), hist, trials, rng)

    def _tournament(self, rng, population: np.ndarray, loss: np.ndarray) -> int:
        k = min(self.settings["tournamentSize"], len(population))
        entrants = rng.choice(population, size=k, replace=False)
        return int(entrants[np.argmin(loss[entrants])])

    def _mutate(self, rng, parent: np.ndarray, scale: np.ndarray) -> np.ndarray:
        enc = self.encoder
        child = parent.copy()
        fresh = enc.random_rows(rng, 1)[0]
        missing = np.isnan(child)
        child[missing] = fresh[missing]  # values for parameters the parent did not use
        active = np.flatnonzero(enc.active(child[None, :])[0])
        rate = self.settings["mutationRate"]
        flip = rng.random(len(active)) < rate
        if not flip.any():
            flip[rng.integers(len(active))] = True
        for j in active[flip]:
            if enc.is_cat[j]:
                k = enc.n_choices[j]
                if k > 1:
                    child[j] = (child[j] + rng.integers(1, k)) % k
            else:
                # Reflect at the bounds so a step never piles values onto an edge.
                u = child[j] + scale[j] * rng.standard_normal()
                u = abs(u) % 2.0
                child[j] = 2.0 - u if u > 1.0 else u
        return enc.snap(child[None, :])[0]
