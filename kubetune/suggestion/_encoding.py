"""Configurations as numeric rows, for the model-based samplers.

One column per parameter, in space order. An ordered parameter (double, int,
discrete) holds its position on the unit interval (`Parameter.to_unit`, so log
scales and steps are already accounted for); a categorical one holds the index
of its value. An inactive parameter (its condition is not met) holds NaN.

Encoding thousands of trials in Python on every ask would dominate the cost of
a sampler, so rows are cached per trial; the cache is checked against the
trial's params object, so it never changes an answer, only its speed.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ..api.space import SearchSpace
from ..api.trial import Trial, TrialState, finite
from .base import Sampler


class Encoder:
    def __init__(self, space: SearchSpace):
        self.space = space
        self.params = space.params
        self.dim = len(self.params)
        self.is_cat = np.array([p.type == "categorical" for p in self.params], dtype=bool)
        self.n_choices = np.array([len(p.values) if p.type == "categorical" else 0 for p in self.params])
        self.cat_cols = np.flatnonzero(self.is_cat)
        self.num_cols = np.flatnonzero(~self.is_cat)
        self.column = {p.name: j for j, p in enumerate(self.params)}
        # Conditions as (parent column, wanted value indices) per column.
        self._conditions = [
            [(self.column[parent], np.array([self.params[self.column[parent]].index(w) for w in wanted]))
             for parent, wanted in p.when.items()]
            for p in self.params
        ]
        # Encoded trials: trial number -> slot; per slot the params object it was made from.
        self._slot: dict[int, int] = {}
        self._params: list = []
        self._keys: list = []
        self._rows = np.empty((0, self.dim))
        self._hashes = np.zeros(0, dtype=np.int64)

    # -- configurations -> rows ---------------------------------------------

    def row(self, params: Mapping) -> np.ndarray:
        out = np.full(self.dim, np.nan)
        active: dict = {}
        for j, p in enumerate(self.params):
            if p.name in params and self.space.is_active(p, active):
                value = params[p.name]
                active[p.name] = value
                out[j] = p.index(value) if self.is_cat[j] else p.to_unit(value)
        return out

    def _cached(self, t: Trial) -> int:
        """Slot of the trial's row in the cache, encoding it if new or changed."""
        slot = self._slot.get(t.number)
        if slot is not None and self._params[slot] is t.params:
            return slot
        if slot is None:
            slot = len(self._params)
            self._slot[t.number] = slot
            self._params.append(None)
            self._keys.append(None)
            if slot >= len(self._rows):
                grow = max(64, len(self._rows))
                self._rows = np.vstack([self._rows, np.empty((grow, self.dim))])
                self._hashes = np.concatenate([self._hashes, np.zeros(grow, dtype=np.int64)])
        self._params[slot] = t.params
        self._rows[slot] = self.row(t.params)
        self._keys[slot] = key = self.space.key(t.params)
        self._hashes[slot] = hash(key)
        return slot

    def trial_rows(self, trials: Sequence[Trial]) -> np.ndarray:
        slots = [self._cached(t) for t in trials]
        return self._rows[slots].reshape(-1, self.dim)

    def is_new(self, config: Mapping, slots: np.ndarray) -> bool:
        """Whether no trial among these cache slots has this configuration."""
        key = self.space.key(config)
        same_hash = slots[self._hashes[slots] == hash(key)]
        return not any(self._keys[s] == key for s in same_hash)

    # -- rows -> configurations ---------------------------------------------

    def decode(self, row: Sequence[float]) -> dict:
        """The configuration of a fully filled row (values of inactive columns are ignored)."""
        out: dict = {}
        for j, p in enumerate(self.params):
            if self.space.is_active(p, out):
                if self.is_cat[j]:
                    out[p.name] = p.values[int(min(max(row[j], 0), len(p.values) - 1))]
                else:
                    out[p.name] = p.from_unit(row[j])
        return out

    def active(self, rows: np.ndarray) -> np.ndarray:
        """Which columns of fully filled rows are active, vectorised over rows."""
        mask = np.ones(rows.shape, dtype=bool)
        for j, conditions in enumerate(self._conditions):
            for parent, wanted in conditions:
                mask[:, j] &= mask[:, parent] & np.isin(self.choice_index(rows[:, parent], parent), wanted)
        return mask

    def choice_index(self, column: np.ndarray, j: int) -> np.ndarray:
        """Index of the chosen value of a categorical or discrete column."""
        if self.is_cat[j]:
            return np.round(column).astype(int)
        k = len(self.params[j].values)
        return np.clip(np.floor(column * k), 0, k - 1).astype(int)

    def snap(self, rows: np.ndarray) -> np.ndarray:
        """Ordered columns moved to the unit position of the value they decode to."""
        rows = rows.copy()
        for j in self.num_cols:
            rows[:, j] = snap_unit(self.params[j], rows[:, j])
        return rows

    def cells(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit-scale bounds of the cell of the value each ordered entry stands for.

        Continuous columns get NaN: their values are points, not cells.
        """
        lo, hi = np.full(rows.shape, np.nan), np.full(rows.shape, np.nan)
        for j in self.num_cols:
            p = self.params[j]
            u = np.clip(rows[:, j], 0.0, 1.0)
            if p.type == "int" and p.log:
                a, b = math.log(p.low - 0.5), math.log(p.high + 0.5)
                v = np.clip(np.round(np.exp(a + u * (b - a))), p.low, p.high)
                lo[:, j], hi[:, j] = (np.log(v - 0.5) - a) / (b - a), (np.log(v + 0.5) - a) / (b - a)
            elif p.n_choices is not None:
                n = p.n_choices
                k = np.minimum(np.floor(u * n), n - 1)
                lo[:, j], hi[:, j] = k / n, (k + 1) / n
        return lo, hi

    def random_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        rows = rng.random((n, self.dim))
        for j in self.cat_cols:
            rows[:, j] = np.floor(rows[:, j] * self.n_choices[j])
        return self.snap(rows)


def snap_unit(p, u: np.ndarray) -> np.ndarray:
    """Unit positions moved to the position of the legal value they stand for."""
    u = np.clip(u, 0.0, 1.0)
    if p.type == "int" and p.log:
        lo, hi = math.log(p.low - 0.5), math.log(p.high + 0.5)
        v = np.clip(np.round(np.exp(lo + u * (hi - lo))), p.low, p.high)
        return (np.log(v) - lo) / (hi - lo)
    n = p.n_choices
    if n is None:
        return u
    return (np.minimum(np.floor(u * n), n - 1) + 0.5) / n


class History:
    """What a model-based sampler learns from: finished rows and their losses (prior
    trials first, then this study's in trial order), and the rows of pending trials."""

    def __init__(self, encoder: Encoder, prior_rows: np.ndarray, prior_loss: np.ndarray, sign: float,
                 trials: Sequence[Trial]):
        slots, done, values, pending = [], [], [], []
        succeeded, running, waiting = TrialState.SUCCEEDED, TrialState.RUNNING, TrialState.PENDING
        cached, slot_of, made_from = encoder._cached, encoder._slot, encoder._params
        for i, t in enumerate(trials):  # the hot loop at thousands of trials: keep it lean
            slot = slot_of.get(t.number)
            if slot is None or made_from[slot] is not t.params:
                slot = cached(t)
            slots.append(slot)
            state = t.state
            if state is succeeded:
                v = t.value
                if (v.__class__ is float and v - v == 0.0) or finite(v):
                    done.append(i)
                    values.append(v)
            elif state is running or state is waiting:
                pending.append(i)
        self.slots = np.array(slots, dtype=int)  # every trial's cache slot, for duplicate checks
        rows = encoder._rows[self.slots]
        self.rows = np.vstack([prior_rows, rows[done]])
        self.loss = np.concatenate([prior_loss, sign * np.array(values, dtype=float)])
        self.n_prior = len(prior_loss)
        self.pending = rows[pending]

    def __len__(self) -> int:
        return len(self.loss)


class ModelSampler(Sampler):
    """A sampler that learns from encoded history; prior (warm-start) trials are encoded once."""

    def __init__(self, space, **kwargs):
        super().__init__(space, **kwargs)
        self.encoder = Encoder(space)
        self._prior_rows = np.array([self.encoder.row(t.params) for t in self.prior]).reshape(-1, self.encoder.dim)
        self._prior_loss = np.array([self.loss(t) for t in self.prior], dtype=float)

    def history(self, trials: Sequence[Trial]) -> History:
        return History(self.encoder, self._prior_rows, self._prior_loss, self.sign, trials)

    def pick_unseen(self, rows: np.ndarray, hist: History, trials: Sequence[Trial],
                    rng: np.random.Generator) -> dict:
        """The first row (in the given order of preference) whose configuration is new."""
        for row in rows:
            config = self.encoder.decode(row)
            if self.encoder.is_new(config, hist.slots):
                return config
        # Every candidate was tried (a small discrete space): fall back to random draws.
        return self.first_unseen((self.space.sample(rng) for _ in range(64)), trials)
