"""CMA-ES with IPOP restarts and warm start from prior trials (WS-CMA-ES).

Ordered parameters are searched by CMA-ES on their unit scale; categorical ones
(which CMA-ES cannot move along) are drawn independently from smoothed
frequencies among the best quarter of the trials, like a univariate TPE, mixed
half and half with a uniform draw (`categoricalExploration`). Frequencies alone
settle on the values of the first lucky trials long before the slow-moving
Gaussian has found where the ordered parameters should be, and a value that
would win with other learning rates is never tried again (bench/samplers.py,
20 seeds: the SGD-on-wine cells went from worse than Optuna's CMA-ES, which
draws categorical values at random, to better or tied; the mixed space stayed
ahead of it).

Samplers must be pure functions of the trial list, so the CMA state is not
stored anywhere: it is *replayed*. Trials are read in trial order; each finished
one is told to the state (a failed or pruned one is skipped), and every
`popsize` told trials make a generation. Replay stops at the first trial still
pending or running, so the state only ever depends on a prefix of finished
trials that can no longer change: a sampler rebuilt after a restart reaches
the same state as the long-lived one, which keeps the replayed state between
asks and only tells the trials that finished since (checking that the prefix
it already consumed is unchanged). The draw of an ask depends on the seed and
the number of trials only, as for every sampler. The price of purity: one
trial that runs for very long holds the state at the generation before it
(asks continue, from that state).

Warm start (WS-CMA-ES, Nomura et al., AAAI 2021): with prior trials, the first
run starts from the Gaussian fitted to the best `warmStartGamma` of them (those
on the best one's basin), each widened by `warmStartAlpha` (`_cma.warm_start`),
and its first trial is that Gaussian's mean, the average of the best prior
configurations and so the warm start's estimate of where the optimum now is.
CMA-ES itself never samples its mean, and the widening puts the draws from a
converged source a good way off it: on bench/warm_start.py's shifted tasks (20
seeds, before the basin choice) the mean alone was as good as the cold run's
best of 100 trials in 5 (Styblinski-Tang) and 4 (Hartmann) seeds, while a
typical first draw scored -94 / -1.88 against the mean's -139 / -2.88. The mean
is told with its generation like any injected solution (a zero step), so a good
mean also shortens the first step and with it the step size. Over 120 seeds the
warm run reached the cold run's best sooner in 49 (Styblinski-Tang) and 68
(Hartmann) seeds and later in 17 and 27. A cold start's mean is the centre of
the space and carries no information, so it is not asked.

IPOP: when a run converges or stalls, it restarts from a random mean with a
doubled population; the restart's mean comes from the seed and restart index.
"""

from __future__ import annotations

import math

import numpy as np

from ..api.settings import Setting, at_least, fraction, positive
from ..api.trial import TrialState, finite
from ._cma import CMA, default_popsize, warm_start
from ._encoding import ModelSampler
from ._threads import small_linear_algebra
from .base import SEED


class _Replay:
    """A CMA state and the trials (with what was read of them) it was built from."""

    def __init__(self, cma: CMA):
        self.cma = cma
        self.restarts = 0
        self.consumed: list[tuple] = []  # (trial, params, state, value) per consumed trial

    def still_valid(self, trials) -> bool:
        if len(trials) < len(self.consumed):
            return False
        for (t, params, state, value), now in zip(self.consumed, trials):
            if now is not t or now.params is not params or now.state is not state or now.value != value:
                return False
        return True


class CMAESSampler(ModelSampler):
    name = "cmaes"
    SETTINGS = {
        "seed": SEED,
        "sigma0": Setting(float, 1 / 6, "initial step size on the unit scale (cold start)", positive),
        "popsize": Setting(int, None, "population size of the first run (default 4 + 3 ln d)", at_least(2)),
        "restarts": Setting(bool, True, "IPOP: restart with a doubled population when a run converges"),
        "warmStartGamma": Setting(float, 0.1, "fraction of prior trials that initialise the search", fraction),
        "warmStartAlpha": Setting(float, 0.1, "spread added around each good prior trial", positive),
        "categoricalExploration": Setting(float, 0.5, "share of uniform draws for categorical parameters "
                                                      "(the rest follows the best quarter)", fraction),
    }

    def __init__(self, space, **kwargs):
        super().__init__(space, **kwargs)
        self.num = self.encoder.num_cols
        self._replay: _Replay | None = None

    # -- the replayed state ---------------------------------------------------------

    def _initial(self, restart: int) -> CMA:
        d = len(self.num)
        popsize = (self.settings["popsize"] or default_popsize(d)) * 2 ** restart
        if restart == 0:
            prior = self._prior_rows[:, self.num]
            if len(prior):
                filled = np.where(np.isnan(prior), 0.5, prior)
                mean, sigma, cov = warm_start(filled, self._prior_loss, self.settings["warmStartGamma"],
                                              self.settings["warmStartAlpha"])
                return CMA(mean, sigma, cov, popsize)
            return CMA(np.full(d, 0.5), self.settings["sigma0"], None, popsize)
        mean = np.random.default_rng([self.seed, 0xC3A, restart]).random(d)
        return CMA(mean, self.settings["sigma0"], None, popsize)

    def _state(self, trials) -> _Replay:
        replay = self._replay
        if replay is None or not replay.still_valid(trials):
            replay = _Replay(self._initial(0))
        start = len(replay.consumed)
        for t in trials[start:]:
            if t.state.active:
                break
            replay.consumed.append((t, t.params, t.state, t.value))
            if t.state != TrialState.SUCCEEDED or not finite(t.value):
                continue
            row = self.encoder.trial_rows([t])[0][self.num]
            x = np.where(np.isnan(row), replay.cma.mean, row)  # inactive: no pull either way
            if replay.cma.tell(x, self.sign * float(t.value)) and self.settings["restarts"] and replay.cma.should_stop():
                replay.restarts += 1
                replay.cma = self._initial(replay.restarts)
        self._replay = replay
        return replay

    # -- asking ---------------------------------------------------------------------

    @small_linear_algebra
    def ask(self, trials):
        rng = self.rng(trials)
        enc = self.encoder
        # The history serves the categorical marginals and the duplicate check; a space with a
        # continuous parameter cannot repeat a Gaussian draw, so it skips both (and their cost).
        needs_history = len(enc.cat_cols) > 0 or all(p.n_choices is not None for p in self.space)
        hist = self.history(trials) if needs_history else None
        n = 64
        rows = np.empty((n, enc.dim))
        if len(self.num):
            cma = self._state(trials).cma
            x = cma.sample(rng, n)
            if not trials and len(self._prior_rows):
                # A warm start's first trial is its mean, the transferred estimate of the optimum
                # (module docstring). The draws are taken all the same: the rng's stream is unchanged.
                x[0] = cma.mean
            inside = np.all((x >= 0) & (x <= 1), axis=1)
            # In-bounds draws first (resampling); clipped ones only as a last resort.
            x = np.vstack([x[inside], np.clip(x[~inside], 0, 1)])
            rows[:, self.num] = x
        for j in enc.cat_cols:
            rows[:, j] = rng.choice(enc.n_choices[j], size=n, p=self._marginal(hist, j))
        if hist is None:
            return enc.decode(enc.snap(rows[:1])[0])
        return self.pick_unseen(enc.snap(rows), hist, trials, rng)

    def _marginal(self, hist, j: int) -> np.ndarray:
        """Frequencies of a categorical value among the best quarter, with one pseudo-count each,
        mixed with the uniform distribution."""
        k = self.encoder.n_choices[j]
        counts = np.ones(k)
        if len(hist):
            top = np.argsort(hist.loss, kind="stable")[: max(1, math.ceil(len(hist) / 4))]
            col = hist.rows[top, j]
            col = col[~np.isnan(col)].astype(int)
            counts += np.bincount(col, minlength=k)
        u = self.settings["categoricalExploration"]
        return (1 - u) * counts / counts.sum() + u / k
