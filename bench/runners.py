"""One optimisation run of a kubetune or Optuna sampler on a problem, and ask latencies."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from kubetune import Study
from kubetune.api.space import SearchSpace
from kubetune.api.trial import Trial, TrialState
from kubetune.suggestion import make_sampler

from .problems import Problem, optuna_params

# kubetune sampler -> its Optuna counterpart (evolution: NSGA-II, Optuna's evolutionary sampler;
# bohb: TPE, the other KDE model; Optuna has no BOHB).
COUNTERPART = {"tpe": "tpe", "gp": "gp", "cmaes": "cmaes", "evolution": "nsga2", "bohb": "tpe", "random": "random"}
KUBETUNE = ["tpe", "gp", "cmaes", "evolution", "bohb", "random"]
OPTUNA = ["tpe", "gp", "cmaes", "nsga2", "random"]


def optuna_sampler(name: str, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[name]()


def best_so_far(values: list[float]) -> list[float]:
    return list(np.minimum.accumulate(np.array(values, dtype=float)))


def run_kubetune(problem: Problem, name: str, seed: int, budget: int, prior=()) -> list[float]:
    study = Study(parameters=problem.params, algorithm={"name": name, "settings": {"seed": seed}}, prior=prior)
    values = []
    for _ in range(budget):
        t = study.ask()
        v = problem(t.params)
        study.tell(t, v)
        values.append(v)
    return best_so_far(values)


def run_optuna(problem: Problem, name: str, seed: int, budget: int) -> list[float]:
    import optuna

    study = optuna.create_study(sampler=optuna_sampler(name, seed))
    values = []
    for _ in range(budget):
        trial = study.ask()
        v = problem(optuna_params(trial, problem))
        study.tell(trial, v)
        values.append(v)
    return best_so_far(values)


# -- latency ------------------------------------------------------------------------

LATENCY_SPACE = [{"name": f"x{i}", "type": "double", "min": -5.0, "max": 5.0} for i in range(5)]


def _sphere(params: dict) -> float:
    return sum(v * v for v in params.values())


def latency_kubetune(name: str, n: int, asks: int) -> dict:
    """ms per ask with n random completed trials: the long-lived sampler, and a fresh instance's first ask."""
    space = SearchSpace.from_spec(LATENCY_SPACE)
    rng = np.random.default_rng(0)
    trials = []
    for i in range(n):
        p = space.sample(rng)
        trials.append(Trial(number=i, params=p, state=TrialState.SUCCEEDED, value=_sphere(p)))
    sampler = make_sampler(name, space, seed=0, goal="minimize")
    t0 = time.perf_counter()
    sampler.ask(trials)
    first = time.perf_counter() - t0
    times = []
    for _ in range(asks):
        t0 = time.perf_counter()
        p = space.canonical(sampler.ask(trials))
        times.append(time.perf_counter() - t0)
        trials.append(Trial(number=len(trials), params=p, state=TrialState.SUCCEEDED, value=_sphere(p)))
    return {"ms": 1e3 * float(np.median(times)), "first_ms": 1e3 * first}


def latency_optuna(name: str, n: int, asks: int) -> dict:
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(sampler=optuna_sampler(name, 0))
    dists = {p["name"]: FloatDistribution(p["min"], p["max"]) for p in LATENCY_SPACE}
    rng = np.random.default_rng(0)
    frozen = []
    for _ in range(n):
        params = {k: float(rng.uniform(-5, 5)) for k in dists}
        frozen.append(optuna.trial.create_trial(params=params, distributions=dists, value=_sphere(params)))
    study.add_trials(frozen)

    def one_ask():
        t0 = time.perf_counter()
        trial = study.ask()
        params = {k: trial.suggest_float(k, -5.0, 5.0) for k in dists}
        dt = time.perf_counter() - t0
        study.tell(trial, _sphere(params))
        return dt

    first = one_ask()
    times = [one_ask() for _ in range(asks)]
    return {"ms": 1e3 * float(np.median(times)), "first_ms": 1e3 * first}


def trials_to_reach(curve: list[float], target: float) -> float:
    """1-based index of the first trial at or below target (inf if never)."""
    for i, v in enumerate(curve):
        if v <= target:
            return i + 1
    return math.inf
