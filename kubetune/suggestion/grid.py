"""Grid search: every combination, in a fixed order, once.

Categorical, discrete and int parameters contribute all their values (ints by
their step); a double contributes its step grid, or `points` values spread
evenly on its scale. Conditional parameters are only combined where active.
"""

from __future__ import annotations

import numpy as np

from ..api.settings import Setting, at_least
from ..api.space import Parameter, SearchSpace
from ..api.validation import Problem
from .base import SEED, Sampler, SearchExhausted

MAX_GRID = 1_000_000


def axis(p: Parameter, points: int) -> list:
    if p.n_choices is not None:
        return [p.from_unit((i + 0.5) / p.n_choices) for i in range(p.n_choices)]
    return [p.from_unit(u) for u in np.linspace(0.0, 1.0, points)]


def grid(space: SearchSpace, points: int, fixed: dict | None = None, start: int = 0):
    """All configurations, depth first in parameter order."""
    fixed = dict(fixed or {})
    params = space.params
    for i in range(start, len(params)):
        p = params[i]
        if space.is_active(p, fixed):
            for v in axis(p, points):
                yield from grid(space, points, {**fixed, p.name: v}, i + 1)
            return
    yield fixed


def grid_size(space: SearchSpace, points: int) -> int:
    """An upper bound on the number of grid points (exact without conditions)."""
    return int(np.prod([len(axis(p, points)) for p in space.params], dtype=float))


class GridSampler(Sampler):
    name = "grid"
    SETTINGS = {
        "seed": SEED,
        "points": Setting(int, 5, "values per double parameter that has no step", at_least(2)),
    }

    def ask(self, trials):
        seen = self.seen(trials)
        for config in grid(self.space, self.settings["points"]):
            if self.space.key(config) not in seen:
                return config
        raise SearchExhausted(f"all grid points were tried ({len(seen)})")

    @classmethod
    def check(cls, settings, space, path):
        problems = super().check(settings, space, path)
        points = (settings or {}).get("points", 5)
        if not problems and grid_size(space, points) > MAX_GRID:
            problems.append(Problem(path, f"the grid has more than {MAX_GRID} points; give steps or fewer points"))
        return problems

