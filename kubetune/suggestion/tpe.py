"""Tree-structured Parzen Estimator (Bergstra et al. 2011; Falkner et al. 2018 for the joint form).

Finished trials are split into a good group (the best `gamma` fraction, at most
`maxGood`) and the rest. A Parzen density is fitted to each, l(x) and g(x);
candidates are drawn from l and the one with the highest l(x)/g(x) wins.

- multivariate (default): one joint density over the unconditional
  parameters, so their interactions are kept; conditional parameters (active
  in only some trials) are chosen one by one, as in the univariate form.
  Kernel widths follow the gaps between neighbouring observations.
- univariate: one density per parameter, each chosen independently.
- Integer, stepped and discrete values are scored by the probability of their
  cell, not the density at a point (a narrow kernel cannot inflate it).
- Pending trials join the bad group (a constant liar), so parallel workers
  asking at once are steered away from each other's points.
- Warm start: prior trials are observations like any other, so the model is
  used from the first ask once there are `startupTrials` of them.
"""

from __future__ import annotations

import math

import numpy as np

from ..api.settings import Setting, at_least, fraction, positive
from ._encoding import ModelSampler
from ._parzen import MAX_BAD, Parzen, good_or_bad_density, thin
from ._threads import small_linear_algebra
from .base import SEED


def recency_weights(n: int, flat: int = 25) -> np.ndarray:
    """Older observations of a group count less once there are many (newest `flat` count fully)."""
    if n <= flat:
        return np.ones(n)
    return np.concatenate([np.linspace(1.0 / n, 1.0, n - flat), np.ones(flat)])


def joint_ranking(enc, l: Parzen, g: Parzen, rng: np.random.Generator, m: int, conditional: np.ndarray) -> np.ndarray:
    """m candidates drawn from l, best l(x)/g(x) first, with the joint densities (multivariate TPE, BOHB).

    Conditional parameters are chosen one by one (as univariate TPE does) and left out of
    the joint score: a joint density that mixes 'inactive' with values blurs both, and it
    favours candidates with more active parameters (each a peaked good kernel > 1 against
    an inactive column's 1), which drew BOHB to whichever SVM kernel had extra parameters.
    """
    cand = enc.snap(l.sample_joint(rng, m))
    active = enc.active(cand)
    if conditional.any():
        marg = enc.snap(l.sample_marginal(rng, m))
        cells = enc.cells(marg)
        per_column = l.log_pdf_marginal(marg, cells) - g.log_pdf_marginal(marg, cells)
        best = marg[np.argmax(per_column, axis=0), np.arange(enc.dim)]
        cand[:, conditional] = best[conditional]
        active = enc.active(cand)
        active[:, conditional] = False
    cells = enc.cells(cand)
    score = l.log_pdf_joint(cand, active, cells) - g.log_pdf_joint(cand, active, cells)
    return cand[np.argsort(-score, kind="stable")]


class TPESampler(ModelSampler):
    name = "tpe"
    SETTINGS = {
        "seed": SEED,
        "multivariate": Setting(bool, True, "one joint density over the unconditional parameters (false: one per parameter)"),
        "startupTrials": Setting(int, 10, "random trials before the model is used (prior trials count)", at_least(2)),
        "candidates": Setting(int, 24, "candidates drawn from the good density per ask", at_least(1)),
        "gamma": Setting(float, 0.1, "fraction of finished trials in the good group", fraction),
        "maxGood": Setting(int, 25, "most trials in the good group", at_least(1)),
        "priorWeight": Setting(float, 1.0, "weight of the uniform component of each density", positive),
        "constantLiar": Setting(bool, True, "count pending trials as bad, so parallel asks differ"),
    }

    def __init__(self, space, **kwargs):
        super().__init__(space, **kwargs)
        self._conditional = np.array([bool(p.when) for p in space.params])

    @small_linear_algebra
    def ask(self, trials):
        rng = self.rng(trials)
        s = self.settings
        hist = self.history(trials)
        n = len(hist)
        if n < s["startupTrials"]:
            return self.first_unseen((self.space.sample(rng) for _ in range(64)), trials)

        n_good = min(max(1, math.ceil(s["gamma"] * n)), s["maxGood"], n - 1)
        order = np.argsort(hist.loss, kind="stable")
        good = np.sort(order[:n_good])  # back in trial order, for the recency weights
        bad = np.sort(order[n_good:])
        good_rows, bad_rows = hist.rows[good], hist.rows[bad]
        if s["constantLiar"] and len(hist.pending):
            bad_rows = np.vstack([bad_rows, hist.pending])

        l = self._density(good_rows, recency_weights(len(good_rows)))
        g = self._density(*thin(bad_rows, recency_weights(len(bad_rows)), MAX_BAD, rng))
        enc = self.encoder
        if s["multivariate"]:
            ranked = joint_ranking(enc, l, g, rng, s["candidates"], self._conditional)
        else:
            cand = enc.snap(l.sample_marginal(rng, s["candidates"]))
            cells = enc.cells(cand)
            per_column = l.log_pdf_marginal(cand, cells) - g.log_pdf_marginal(cand, cells)
            best = cand[np.argmax(per_column, axis=0), np.arange(enc.dim)]
            total = np.where(enc.active(cand), per_column, 0.0).sum(axis=1)
            ranked = np.vstack([best, cand[np.argsort(-total, kind="stable")]])
        return self.pick_unseen(ranked, hist, trials, rng)

    def _density(self, rows: np.ndarray, weights: np.ndarray) -> Parzen:
        return good_or_bad_density(rows, weights, self.encoder.n_choices, self.settings["priorWeight"])
