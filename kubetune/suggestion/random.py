"""Random search: each parameter drawn independently on its own scale."""

from __future__ import annotations

from .base import Sampler


class RandomSampler(Sampler):
    name = "random"

    def ask(self, trials):
        rng = self.rng(trials)
        # On a small discrete space a draw may repeat a tried configuration; redraw a few times.
        draws = (self.space.sample(rng) for _ in range(64))
        return self.first_unseen(draws, trials)
