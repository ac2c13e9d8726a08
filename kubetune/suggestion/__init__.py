"""The searching methods: one module per sampler, all behind `Sampler`.

Pure Python + numpy/scipy, deterministic under a seed; no I/O, no Kubernetes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..api.space import SearchSpace
from ..api.trial import Trial
from ..api.validation import Problem, suggestion
from .base import Sampler, SearchExhausted
from .grid import GridSampler
from .random import RandomSampler
from .sobol import SobolSampler
from .bohb import BOHBSampler
from .cmaes import CMAESSampler
from .evolution import EvolutionSampler
from .gp import GPSampler
from .tpe import TPESampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (RandomSampler, GridSampler, SobolSampler, TPESampler, GPSampler, CMAESSampler, EvolutionSampler,
                BOHBSampler)
}


def check_algorithm(algorithm: Mapping[str, Any] | None, parameters: list, path: str) -> list[Problem]:
    if not algorithm:
        return []
    name = algorithm["name"]
    if name not in SAMPLERS:
        return [Problem(f"{path}.name", f"unknown algorithm {name!r}; {suggestion(name, sorted(SAMPLERS))} (known: {', '.join(sorted(SAMPLERS))})")]
    return SAMPLERS[name].check(algorithm.get("settings"), SearchSpace.from_spec(parameters), path)


def make_sampler(
    name: str,
    space: SearchSpace,
    *,
    seed: int,
    goal: str,
    settings: Mapping[str, Any] | None = None,
    prior: Sequence[Trial] = (),
) -> Sampler:
    return SAMPLERS[name](space, seed=seed, goal=goal, settings=settings, prior=prior)


__all__ = ["SAMPLERS", "Sampler", "SearchExhausted", "check_algorithm", "make_sampler"]
