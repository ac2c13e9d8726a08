"""Bayesian optimisation with a Gaussian-process surrogate and log expected improvement.

- Inputs: ordered parameters on their unit scale (ints and steps snapped to the
  value they stand for), categorical ones one-hot; an inactive parameter sits
  at a fixed neutral point, so the GP sees the same input for "not used".
- Surrogate: Matérn 5/2 ARD (`_gp.py`), hyperparameters by marginal likelihood.
- Acquisition: log-EI, maximised over a scrambled Sobol set plus perturbations
  of the best trials, then refined by a shrinking local search that also flips
  categorical values (so discrete inputs never need a continuous relaxation).
- Outputs: losses above Tukey's upper fence are lowered to it, then standardised.
- Pending trials are added to the data at the best value seen (a constant
  liar): the posterior variance there collapses, so parallel asks spread out.
- At thousands of trials the GP is fitted to a bounded subset (the best half,
  the most recent quarter, a random rest), which keeps an ask well under a second.
- Warm start: prior trials are data like any other.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.stats import qmc

from ..api.settings import Setting, at_least
from ._encoding import Encoder, ModelSampler
from ._gp import GP, log_ei, log_ei_and_grad
from ._threads import small_linear_algebra
from .base import SEED


def features(enc: Encoder, rows: np.ndarray) -> np.ndarray:
    """GP inputs of encoded rows: unit values (0.5 when inactive) and one-hot categories."""
    cols = []
    for j in range(enc.dim):
        col = rows[:, j]
        if enc.is_cat[j]:
            onehot = np.zeros((len(rows), enc.n_choices[j]))
            ok = ~np.isnan(col)
            onehot[np.flatnonzero(ok), col[ok].astype(int)] = 1.0
            cols.append(onehot)
        else:
            cols.append(np.where(np.isnan(col), 0.5, col)[:, None])
    return np.hstack(cols)


def standardise(v: np.ndarray) -> np.ndarray:
    sd = v.std()
    return (v - v.mean()) / (sd if sd > 0 else 1.0)


def fence(loss: np.ndarray) -> np.ndarray:
    """Losses above Tukey's upper fence (q3 + 1.5 IQR) lowered to it.

    A few very bad trials (a diverged model's log-loss in the tens among values near 0.05)
    would otherwise take the whole standardised range, leave the good region flat
    to the GP, and make its fit explain everything as noise or wiggles. Only the bad
    tail is cut: the values that decide where to search next are untouched.
    """
    q1, q3 = np.percentile(loss, [25, 75])
    return np.minimum(loss, q3 + 1.5 * (q3 - q1))


def subset(loss: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most `cap` observations: the best half, the newest quarter, random others."""
    n = len(loss)
    if n <= cap:
        return np.arange(n)
    best = np.argsort(loss, kind="stable")[: cap // 2]
    rest = np.setdiff1d(np.arange(n), best)
    newest = rest[-(cap // 4):]
    others = np.setdiff1d(rest, newest)
    pick = rng.choice(others, size=cap - len(best) - len(newest), replace=False)
    return np.sort(np.concatenate([best, newest, pick]))


class GPSampler(ModelSampler):
    name = "gp"
    SETTINGS = {
        "seed": SEED,
        "startupTrials": Setting(int, 10, "quasi-random (Sobol) trials before the GP is used (prior trials count)", at_least(2)),
        "maxPoints": Setting(int, 300, "most observations the GP is fitted to (a subset beyond that)", at_least(10)),
        "candidates": Setting(int, 2048, "quasi-random candidates scored per ask before local refinement", at_least(1)),
        "gradientStarts": Setting(int, 5, "best quasi-random candidates (besides the locally refined ones) "
                                  "that start a gradient ascent of log-EI", at_least(0)),
    }

    def __init__(self, space, **kwargs):
        super().__init__(space, **kwargs)
        enc = self.encoder
        widths = [int(enc.n_choices[j]) if enc.is_cat[j] else 1 for j in range(enc.dim)]
        offset = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)
        # Columns a gradient can move: continuous doubles (no step), and their GP input columns.
        self._smooth = np.array([j for j, p in enumerate(space.params)
                                 if p.type == "double" and p.n_choices is None], dtype=int)
        self._smooth_feature = offset[self._smooth]

    @small_linear_algebra
    def ask(self, trials):
        rng = self.rng(trials)
        s = self.settings
        hist = self.history(trials)
        enc = self.encoder
        if len(hist) < s["startupTrials"]:
            return self._sobol(trials)

        keep = subset(hist.loss, s["maxPoints"], rng)
        rows, loss = hist.rows[keep], hist.loss[keep]
        y = standardise(fence(loss))
        x = features(enc, rows)
        gp = GP(x, y)
        best = y.min()
        if len(hist.pending):
            gp.condition(np.vstack([x, features(enc, hist.pending)]), np.concatenate([y, np.full(len(hist.pending), best)]))

        def score(cand: np.ndarray) -> np.ndarray:
            cand = np.where(enc.active(cand), cand, np.nan)
            m, v = gp.predict(features(enc, cand))
            return log_ei(m, v, best)

        pool = np.vstack([self._sobol_rows(rng, s["candidates"]),
                          self._perturb(rng, rows[np.argsort(y, kind="stable")[:5]], 0.05, 32)])
        pool_score = score(pool)
        cand, cand_score = self._refine(rng, pool, pool_score, score)
        top = pool[np.argsort(-pool_score, kind="stable")[:s["gradientStarts"]]]
        climbed = self._ascend(gp, best, np.vstack([cand, top]))
        climbed_score = score(climbed) if len(climbed) else np.zeros(0)
        everything = np.vstack([climbed, cand, pool])
        ranked = everything[np.argsort(-np.concatenate([climbed_score, cand_score, pool_score]), kind="stable")]
        return self.pick_unseen(ranked, hist, trials, rng)

    # -- candidates ---------------------------------------------------------------

    def _sobol(self, trials) -> dict:
        engine = qmc.Sobol(d=self.encoder.dim, scramble=True, seed=self.seed)
        if trials:
            engine.fast_forward(len(trials))
        points = (self.space.from_unit(engine.random(1)[0]) for _ in range(64))
        return self.first_unseen(points, trials)

    def _sobol_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        enc = self.encoder
        u = qmc.Sobol(d=enc.dim, scramble=True, seed=rng).random(n)
        for j in enc.cat_cols:
            u[:, j] = np.minimum(np.floor(u[:, j] * enc.n_choices[j]), enc.n_choices[j] - 1)
        return enc.snap(u)

    def _perturb(self, rng: np.random.Generator, rows: np.ndarray, radius: float, per_row: int) -> np.ndarray:
        """Neighbours of each row: Gaussian steps on ordered columns, occasional new categories."""
        enc = self.encoder
        base = np.repeat(np.where(np.isnan(rows), rng.random(rows.shape), rows), per_row, axis=0)
        for j in enc.cat_cols:
            col = base[:, j]
            col = np.where(np.isnan(col) | (col >= enc.n_choices[j]), 0, col)
            flip = rng.random(len(base)) < 1.0 / max(enc.dim, 2)
            base[:, j] = np.where(flip, rng.integers(0, enc.n_choices[j], len(base)),
                                   np.minimum(np.round(col), enc.n_choices[j] - 1))
        num = enc.num_cols
        base[:, num] = np.clip(base[:, num] + radius * rng.standard_normal((len(base), len(num))), 0.0, 1.0)
        return enc.snap(base)

    def _ascend(self, gp: GP, best: float, starts: np.ndarray) -> np.ndarray:
        """Each start climbed by L-BFGS-B on log-EI over its active continuous columns.

        In high dimensions random perturbations rarely find log-EI's maximum; its gradient
        does. The variables are scaled by the fitted length scales, so every direction is
        equally steep for the optimiser (a preconditioning).
        """
        enc, cols, feats = self.encoder, self._smooth, self._smooth_feature
        if not len(cols) or not len(starts):
            return starts[:0]
        ls = 1.0 / np.sqrt(gp.w[feats])
        out = []
        for start in starts:
            row = np.where(enc.active(start[None, :])[0], start, np.nan)
            free = ~np.isnan(row[cols])
            if not free.any():
                continue
            x0 = features(enc, row[None, :])[0]
            fc, sc = feats[free], ls[free]

            def negative(u):
                x = x0.copy()
                x[fc] = u * sc
                value, grad = log_ei_and_grad(gp, x[None, :], best)
                return -float(value[0]), -grad[0, fc] * sc

            res = minimize(negative, x0[fc] / sc, jac=True, method="L-BFGS-B",
                           bounds=[(0.0, 1.0 / l) for l in sc], options={"maxiter": 50})
            moved = start.copy()
            moved[cols[free]] = np.clip(res.x * sc, 0.0, 1.0)
            out.append(moved)
        return enc.snap(np.array(out)) if out else starts[:0]

    def _refine(self, rng, pool, pool_score, score, starts: int = 5, rounds: int = 8, per_round: int = 32):
        """Local search from the best distinct candidates with a shrinking step."""
        order = np.argsort(-pool_score, kind="stable")
        current, current_score = pool[order[:starts]].copy(), pool_score[order[:starts]].copy()
        radius = 0.1
        for _ in range(rounds):
            trial_rows = self._perturb(rng, current, radius, per_round)
            trial_score = score(trial_rows).reshape(len(current), per_round)
            pick = trial_score.argmax(axis=1)
            better = trial_score[np.arange(len(current)), pick] > current_score
            rows3 = trial_rows.reshape(len(current), per_round, -1)
            current[better] = rows3[np.flatnonzero(better), pick[better]]
            current_score[better] = trial_score[np.arange(len(current)), pick][better]
            radius *= 0.6
        return current, current_score
