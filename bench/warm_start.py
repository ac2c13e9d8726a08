"""Warm start on a shifted function: does a prior experiment make the next one twice as fast?

For each seed: run the sampler for 100 trials on a source task (the function
with its optimum moved), hand those trials as `prior` to a run on the target
task, and count how many trials the warm run needs to reach the value that a
cold run of the same seed reached after 100. The issue's target: at most 50.
"""

from __future__ import annotations

import math

import numpy as np

from kubetune import Study

from .problems import Problem, box, hartmann6, styblinski_tang
from .runners import best_so_far, run_kubetune, trials_to_reach

BUDGET = 100

# name -> (source task, target task): the same function, optimum moved by a small shift.
WARM_PROBLEMS = {
    "styblinski-tang-5d-shifted": (
        Problem("st-source", box([f"x{i}" for i in range(5)], -5, 5), lambda c: styblinski_tang(c, shift=0.4)),
        Problem("st-target", box([f"x{i}" for i in range(5)], -5, 5), styblinski_tang),
    ),
    "hartmann-6d-shifted": (
        Problem("h6-source", box([f"x{i}" for i in range(6)], 0, 1), lambda c: hartmann6(c, shift=0.05)),
        Problem("h6-target", box([f"x{i}" for i in range(6)], 0, 1), hartmann6),
    ),
}


def source_trials(problem: Problem, name: str, seed: int) -> list[dict]:
    study = Study(parameters=problem.params, algorithm={"name": name, "settings": {"seed": seed}})
    out = []
    for _ in range(BUDGET):
        t = study.ask()
        v = problem(t.params)
        study.tell(t, v)
        out.append({"params": t.params, "value": v})
    return out


def warm_start_job(job):
    name, problem, seed = job
    source, target = WARM_PROBLEMS[problem]
    prior = source_trials(source, name, seed + 1000)
    cold = run_kubetune(target, name, seed, BUDGET)
    warm = run_kubetune(target, name, seed, BUDGET, prior=prior)
    return ("warm", name, problem, seed, cold, warm)


def warm_table(results) -> list[str]:
    groups: dict = {}
    for _, name, problem, seed, cold, warm in results:
        groups.setdefault((problem, name), []).append((cold, warm))
    out = [f"Prior: {BUDGET} trials of the same sampler on the shifted source task (its own seed). "
           f"'Trials to reach' = first warm trial at or below the cold run's best after {BUDGET} (same seed); "
           "target: median at most half the cold budget.", "",
           "| problem | sampler | seeds | cold best @100 | warm best @50 | median trials to reach | 90% interval | "
           "seeds within 50 | target met |",
           "| --- | --- | ---: | ---: | ---: | ---: | :---: | ---: | :---: |"]
    for (problem, name) in sorted(groups):
        runs = groups[(problem, name)]
        reach = [trials_to_reach(warm, cold[-1]) for cold, warm in runs]
        med = float(np.median(reach))
        within = sum(r <= BUDGET // 2 for r in reach)
        cold_best = float(np.median([c[-1] for c, _ in runs]))
        warm50 = float(np.median([w[BUDGET // 2 - 1] for _, w in runs]))
        lo, hi = median_interval(np.array(reach, dtype=float))
        out.append(f"| {problem} | {name} | {len(runs)} | {cold_best:.4f} | {warm50:.4f} | {_trials(med)} | "
                   f"{_trials(lo)}-{_trials(hi)} | {within}/{len(runs)} | {'yes' if med <= BUDGET // 2 else 'no'} |")
    return out


def median_interval(values: np.ndarray, reps: int = 2000) -> tuple[float, float]:
    """90% bootstrap interval of the median over seeds ("never" is infinite, and stays so)."""
    idx = np.random.default_rng(0).integers(len(values), size=(reps, len(values)))
    medians = np.median(values[idx], axis=1)
    return float(np.quantile(medians, 0.05, method="lower")), float(np.quantile(medians, 0.95, method="higher"))


def _trials(v: float) -> str:
    return "never" if math.isinf(v) else f"{v:g}"  # a median of an even count can end in .5


__all__ = ["WARM_PROBLEMS", "warm_start_job", "warm_table", "best_so_far"]
