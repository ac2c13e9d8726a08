"""The interface every sampler implements.

A sampler proposes the next configuration from the trials so far. It is pure:
the same space, settings, seed and trials give the same answer, so a sampler
rebuilt after a restart carries on exactly where the old one stopped. Values
reach it as losses (lower is better) whatever the experiment's goal.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..api.settings import Setting, check_settings, resolve_settings
from ..api.space import SearchSpace
from ..api.trial import Trial, TrialState, finite
from ..api.validation import Problem


class SearchExhausted(Exception):
    """The sampler has nothing new to propose (e.g. every grid point was tried)."""


SEED = Setting(int, None, "seed of the sampler's random numbers; same seed, same suggestions")


class Sampler:
    name: ClassVar[str]
    SETTINGS: ClassVar[dict[str, Setting]] = {"seed": SEED}

    def __init__(
        self,
        space: SearchSpace,
        *,
        seed: int,
        goal: str = "minimize",
        settings: Mapping[str, Any] | None = None,
        prior: Sequence[Trial] = (),
    ):
        self.space = space
        self.seed = int(seed)
        self.sign = -1.0 if goal == "maximize" else 1.0
        self.settings = resolve_settings(self.SETTINGS, settings)
        # Finished trials of earlier experiments (warm start), same goal.
        self.prior = [t for t in prior if t.state == TrialState.SUCCEEDED and finite(t.value)]

    def ask(self, trials: Sequence[Trial]) -> dict:
        """The next configuration, given every trial so far (pending ones included)."""
        raise NotImplementedError

    @classmethod
    def check(cls, settings: Mapping[str, Any] | None, space: SearchSpace, path: str) -> list[Problem]:
        """Problems with these settings on this space; subclasses add their own rules."""
        return check_settings(cls.SETTINGS, settings, f"{path}.settings")

    # -- helpers for subclasses --------------------------------------------

    def rng(self, trials: Sequence[Trial], salt: int = 0) -> np.random.Generator:
        """Random numbers for one ask: a function of the seed and the trial count only."""
        return np.random.default_rng([self.seed, len(trials), salt])

    def loss(self, trial: Trial) -> float:
        return self.sign * float(trial.value)

    def completed(self, trials: Sequence[Trial], with_prior: bool = True) -> list[tuple[dict, float]]:
        """(params, loss) of every trial with a finished objective value."""
        done = [t for t in trials if t.state == TrialState.SUCCEEDED and finite(t.value)]
        if with_prior:
            done = self.prior + done
        return [(t.params, self.loss(t)) for t in done]

    def seen(self, trials: Sequence[Trial]) -> set:
        return {self.space.key(t.params) for t in trials}

    def first_unseen(self, candidates, trials: Sequence[Trial]) -> dict:
        """The first candidate not tried yet; the last one if every candidate was."""
        if self.space.has_free_continuous:
            # No draw can repeat a tried configuration: skip building the set of every trial's key.
            for config in candidates:
                return config
        seen = self.seen(trials)
        last = None
        for config in candidates:
            last = config
            if self.space.key(config) not in seen:
                return config
        if last is None:
            raise SearchExhausted("no candidate configuration")
        return last
