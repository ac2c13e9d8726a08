"""CMA-ES on the unit cube (Hansen's tutorial, arXiv:1604.00772), with WS-CMA-ES initialisation.

`CMA` is the evolution state: mean, step size, covariance and evolution paths.
Solutions are told one at a time and the state updates once a generation
(`popsize` solutions) is complete. Told solutions need not be the ones this
state sampled (they come from trials, possibly asked under an older state), so
each step is clipped to a plausible Mahalanobis length first, as Hansen
recommends for injected solutions.
"""

from __future__ import annotations

import math

import numpy as np


def default_popsize(dim: int) -> int:
    return 4 + int(3 * math.log(max(dim, 1)))


class CMA:
    def __init__(self, mean: np.ndarray, sigma: float, cov: np.ndarray | None = None, popsize: int | None = None):
        self.dim = d = len(mean)
        self.mean = np.array(mean, dtype=float)
        self.sigma = float(sigma)
        self.cov = np.eye(d) if cov is None else np.array(cov, dtype=float)
        self.popsize = lam = popsize or default_popsize(d)
        mu = lam // 2
        # Hansen's tutorial (2016), eqs. 49-53: positive weights for the better half, negative
        # ones for the worse half (active CMA: the covariance shrinks along bad directions).
        raw = math.log((lam + 1) / 2) - np.log(np.arange(1, lam + 1))
        pos, neg = raw[:mu], raw[mu:]
        self.mu_eff = me = pos.sum() ** 2 / (pos ** 2).sum()
        me_neg = neg.sum() ** 2 / (neg ** 2).sum() if len(neg) and neg.sum() else 0.0
        self.c_sigma = (me + 2) / (d + me + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((me - 1) / (d + 1)) - 1) + self.c_sigma
        self.c_c = (4 + me / d) / (d + 4 + 2 * me / d)
        self.c_1 = 2 / ((d + 1.3) ** 2 + me)
        self.c_mu = min(1 - self.c_1, 2 * (me - 2 + 1 / me) / ((d + 2) ** 2 + me))
        shrink = min(1 + self.c_1 / self.c_mu, 1 + 2 * me_neg / (me + 2),
                     (1 - self.c_1 - self.c_mu) / (d * self.c_mu))
        self.weights = np.concatenate([pos / pos.sum(), neg * shrink / np.abs(neg).sum() if neg.sum() else neg])
        self.chi_n = math.sqrt(d) * (1 - 1 / (4 * d) + 1 / (21 * d * d))
        self.max_step = math.sqrt(d) + 2 * d / (d + 2)  # Mahalanobis clip for told solutions
        self.p_sigma = np.zeros(d)
        self.p_c = np.zeros(d)
        self.generation = 0
        self.pending: list[tuple[np.ndarray, float]] = []
        self.best_history: list[float] = []  # best loss of each generation, for the stop test
        self._decompose()

    def _decompose(self) -> None:
        self.cov = (self.cov + self.cov.T) / 2
        eigval, self.basis = np.linalg.eigh(self.cov)
        self.scales = np.sqrt(np.maximum(eigval, 1e-20))  # D: standard deviations along the basis

    # -- sampling ------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.dim))
        return self.mean + self.sigma * (z * self.scales) @ self.basis.T

    # -- learning ------------------------------------------------------------------

    def tell(self, x: np.ndarray, loss: float) -> bool:
        """Adds one solution; True when it completed a generation (and the state moved)."""
        self.pending.append((np.asarray(x, dtype=float), float(loss)))
        if len(self.pending) < self.popsize:
            return False
        self._update(self.pending)
        self.pending = []
        return True

    def _whiten(self, y: np.ndarray) -> np.ndarray:
        """C^-1/2 y."""
        return self.basis @ ((self.basis.T @ y) / self.scales)

    def _update(self, batch) -> None:
        d, w = self.dim, self.weights
        batch = sorted(batch, key=lambda item: item[1])  # stable: ties keep their trial order
        ys = []
        for x, _ in batch[: len(w)]:
            y = (x - self.mean) / self.sigma
            length = np.linalg.norm(self._whiten(y))
            if length > self.max_step:
                y = y * (self.max_step / length)
            ys.append(y)
        ys = np.array(ys)
        w = w[: len(ys)]
        mu = min(len(ys), self.popsize // 2)
        y_w = w[:mu] @ ys[:mu]  # the mean moves by the positive weights only
        self.mean = self.mean + self.sigma * y_w

        g = self.generation + 1
        cs = self.c_sigma
        self.p_sigma = (1 - cs) * self.p_sigma + math.sqrt(cs * (2 - cs) * self.mu_eff) * self._whiten(y_w)
        norm_ps = np.linalg.norm(self.p_sigma)
        h_sigma = norm_ps / math.sqrt(1 - (1 - cs) ** (2 * g)) < (1.4 + 2 / (d + 1)) * self.chi_n
        cc = self.c_c
        self.p_c = (1 - cc) * self.p_c + h_sigma * math.sqrt(cc * (2 - cc) * self.mu_eff) * y_w
        delta = (1 - h_sigma) * cc * (2 - cc)
        # Negative weights act on directions rescaled to length sqrt(d), so that a long bad
        # step cannot remove more variance than a short one (tutorial, eq. 46).
        w_o = w.copy()
        bad = w < 0
        if bad.any():
            lengths = np.array([np.dot(v, v) for v in (self._whiten(y) for y in ys[bad])])
            w_o[bad] *= d / np.maximum(lengths, 1e-20)
        rank_mu = (ys.T * w_o) @ ys
        self.cov = ((1 + self.c_1 * delta - self.c_1 - self.c_mu * w.sum()) * self.cov
                    + self.c_1 * np.outer(self.p_c, self.p_c) + self.c_mu * rank_mu)
        self.sigma *= math.exp(min(1.0, (cs / self.d_sigma) * (norm_ps / self.chi_n - 1)))
        self.sigma = min(self.sigma, 1e3)
        self.generation = g
        self.best_history.append(batch[0][1])
        self._last_losses = [loss for _, loss in batch]
        self._decompose()

    def should_stop(self) -> bool:
        """Converged or stuck (the IPOP restart test)."""
        if self.generation == 0:
            return False
        d = self.dim
        spread = self.sigma * self.scales.max()
        if spread < 1e-12 or spread > 1e4:
            return True
        if self.scales.max() / self.scales.min() > 1e7:  # condition number of C above 1e14
            return True
        window = 10 + math.ceil(30 * d / self.popsize)
        recent = self.best_history[-window:] + self._last_losses
        if len(self.best_history) >= window and max(recent) - min(recent) < 1e-12:
            return True
        # Nothing improved over many generations.
        long_window = 20 + math.ceil(60 * d / self.popsize)
        if len(self.best_history) > long_window:
            history = self.best_history
            if min(history[-long_window // 2:]) >= min(history[-long_window: -long_window // 2]):
                return True
        return False


def warm_start(rows: np.ndarray, loss: np.ndarray, gamma: float = 0.1, alpha: float = 0.1):
    """WS-CMA-ES (Nomura et al., AAAI 2021): mean, step size and covariance from good prior solutions.

    The promising solutions (best `gamma` fraction) each stand for a Gaussian of
    width `alpha`; the single Gaussian closest to their mixture has the mean of
    the points and their covariance plus alpha^2 I.

    That Gaussian covers the whole mixture. When the promising solutions lie in
    separate basins (a source run that had not settled on one), its mean falls
    between them and CMA-ES, a local search, starts in the ridge between basins
    with a step size stretched across them. So only the solutions on the best
    one's mode of the mixture are used: each climbs the mixture's density by mean
    shift, and those that reach the best solution's mode make the Gaussian. Where
    the mixture has one mode (the usual case: a converged source) this is the
    paper's estimate. On bench/warm_start.py's Styblinski-Tang (2^5 basins) over
    240 seeds, the warm run reached the cold run's best sooner in 46 seeds and
    later in 19 (within 50 trials: 123 -> 131); Hartmann 27 / 37 (187 -> 185).
    With 100 random-search trials as the prior, whose best tenth is scattered
    (in 5-6 dimensions each point is its own mode at this width), the Gaussian
    sits at the best prior point instead of spanning the box: within 50 trials
    in 33 of 60 seeds instead of 18 (Styblinski-Tang) and 32 instead of 8
    (Hartmann).
    """
    n, d = rows.shape
    top = max(math.ceil(gamma * n), min(n, 2))
    best = rows[np.argsort(loss, kind="stable")[:top]]
    best = best[_on_best_mode(best, alpha)]
    k = len(best)
    mean = best.mean(axis=0)
    centred = best - mean
    sigma_mat = alpha ** 2 * np.eye(d) + centred.T @ centred / k
    sigma = float(np.linalg.det(sigma_mat) ** (1.0 / (2 * d)))
    return mean, sigma, sigma_mat / sigma ** 2


def _on_best_mode(points: np.ndarray, alpha: float, steps: int = 100, most: int = 300) -> np.ndarray:
    """Which points reach, by mean shift on the mixture of N(p, alpha^2 I) over the points,
    the mode that the first point reaches. Beyond the first `most` points (a very large
    prior), a point goes with the nearest of those."""
    kernel = points[:most]
    x = kernel.copy()
    sq = (kernel ** 2).sum(axis=1)
    for _ in range(steps):
        d2 = (x ** 2).sum(axis=1)[:, None] + sq[None, :] - 2 * x @ kernel.T
        w = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / (2 * alpha ** 2))
        moved = (w @ kernel) / w.sum(axis=1, keepdims=True)
        done = np.abs(moved - x).max() < 1e-6 * alpha
        x = moved
        if done:
            break
    # Two kernels of width alpha make two modes only when more than 2 alpha apart.
    on = np.linalg.norm(x - x[0], axis=1) < alpha / 2
    if len(points) > most:
        rest = points[most:]
        nearest = np.argmin((rest ** 2).sum(axis=1)[:, None] + sq[None, :] - 2 * rest @ kernel.T, axis=1)
        on = np.concatenate([on, on[nearest]])
    return on
