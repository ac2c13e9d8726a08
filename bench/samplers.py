"""kubetune's samplers against Optuna 5's on the same problems, budgets and seeds.

    python -m bench.samplers --quick     # a few minutes' smoke run
    python -m bench.samplers             # the full table (bench/RESULTS.md), about 1.5 hours on 2 cores

Prints markdown: median best value per (problem, budget) for each kubetune
sampler next to its Optuna counterpart, wins/ties/losses, the warm-start
check, and ask latency at 100 / 1,000 / 10,000 completed trials.

A cell is a tie when the two medians differ by at most 1e-3 x max(1, |optimum|)
(for the scikit-learn problems 1e-3 of CV log-loss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from multiprocessing import Pool

import numpy as np

from . import runners
from .problems import PROBLEMS
from .runners import COUNTERPART, KUBETUNE, OPTUNA
from .warm_start import WARM_PROBLEMS, warm_start_job

FULL = {
    "problems": list(PROBLEMS),
    # 20 seeds: with 10, two samplers of equal quality often have medians further apart than
    # the tie tolerance (kubetune random vs Optuna random: 46% "at least as good" at 10 seeds).
    "seeds": 20,
    "budgets": [50, 100, 200],
    # GP runs like every other sampler: Optuna's GPSampler costs O(n^3) per ask (~4 s at 1,000
    # trials, so its latency is measured on few asks) but a 200-trial run only ~15 CPU-s.
    "latency": {100: 20, 1000: 10, 10000: 5},
    "optuna_gp_latency": {100: 5, 1000: 2},  # 10,000: hours per ask, skipped
    "kubetune_gp_latency": {100: 10, 1000: 5, 10000: 3},
    # Trials-to-reach has a heavy tail ("never" in a third to a half of the seeds): its median over 10
    # seeds moved from 24 to 53 trials on a change at floating-point rounding level, and blocks of 20
    # seeds put 7 to 15 of them within 50. A warm-start run costs ~0.2 CPU-s, so it gets 100 seeds.
    "warm_seeds": 100,
    "warm_samplers": ["tpe", "cmaes", "evolution", "bohb"],
    "warm_problems": list(WARM_PROBLEMS),
}
QUICK = {
    "problems": ["branin-2d", "hartmann-6d", "mixed-conditional"],
    "seeds": 3,
    "budgets": [50],
    "latency": {100: 10, 1000: 5},
    "optuna_gp_latency": {100: 3},
    "kubetune_gp_latency": {100: 5, 1000: 2},
    "warm_seeds": 3,
    "warm_samplers": ["tpe", "cmaes"],
    "warm_problems": ["styblinski-tang-5d-shifted"],
}


def quality_job(job):
    lib, name, problem, seed, budget = job
    t0 = time.perf_counter()
    run = runners.run_kubetune if lib == "kubetune" else runners.run_optuna
    curve = run(PROBLEMS[problem], name, seed, budget)
    return ("quality", job, curve, time.perf_counter() - t0)


def dispatch(job):
    if job[0] == "warm":
        return warm_start_job(job[1:])
    return quality_job(job[1:])


def dispatch_keyed(job):
    return job, dispatch(job)


def _plain(res):
    """JSON-ready copy of a job's result (tuples as lists, numpy floats as floats)."""
    if isinstance(res, (list, tuple)):
        return [_plain(r) for r in res]
    if isinstance(res, (np.floating, float)):
        return float(res)
    if isinstance(res, np.integer):
        return int(res)
    return res


def jobs_for(cfg) -> list:
    jobs = []
    top = max(cfg["budgets"])
    for problem in cfg["problems"]:
        for seed in range(cfg["seeds"]):
            for lib, names in (("kubetune", KUBETUNE), ("optuna", OPTUNA)):
                for name in names:
                    jobs.append(("quality", lib, name, problem, seed, top))
    for problem in cfg["warm_problems"]:
        for seed in range(cfg["warm_seeds"]):
            for name in cfg["warm_samplers"]:
                jobs.append(("warm", name, problem, seed))

    def cost(job):  # longest first, so the two workers finish together
        if job[0] == "warm":
            return 50 if job[1] == "gp" else 5
        _, lib, name, problem, _, budget = job
        c = {"gp": 100 if lib == "optuna" else 20}.get(name, 1) * budget / 100
        return c + (30 if problem.startswith(("svm", "sgd")) else 0)

    return sorted(jobs, key=cost, reverse=True)


# -- tables -----------------------------------------------------------------------------


def tie_tolerance(problem: str) -> float:
    p = PROBLEMS[problem]
    return 1e-3 * max(1.0, abs(p.optimum or 0.0))


def verdict(ours: float, theirs: float, tol: float) -> str:
    if abs(ours - theirs) <= tol:
        return "tie"
    return "win" if ours < theirs else "loss"


def fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e4):
        return f"{v:.3g}"
    return f"{v:.4f}" if a < 10 else f"{v:.2f}"


def quality_tables(cfg, results) -> tuple[list[str], dict]:
    """Per kubetune sampler: a table of cells, and the summary counts."""
    med = {}
    for (lib, name, problem, seed, budget), curve in results.items():
        for b in cfg["budgets"]:
            if b <= len(curve):
                med.setdefault((lib, name, problem, b), []).append(curve[b - 1])
    med = {k: float(np.median(v)) for k, v in med.items()}
    out, summary = [], {}
    for name in KUBETUNE:
        other = COUNTERPART[name]
        out += [f"### kubetune `{name}` vs Optuna `{other}`", "",
                f"| problem | budget | kubetune {name} | Optuna {other} | vs Optuna | kubetune random | vs random |",
                "| --- | ---: | ---: | ---: | :---: | ---: | :---: |"]
        counts = defaultdict(int)
        for problem in cfg["problems"]:
            tol = tie_tolerance(problem)
            for b in cfg["budgets"]:
                ours = med.get(("kubetune", name, problem, b))
                theirs = med.get(("optuna", other, problem, b))
                rand = med.get(("kubetune", "random", problem, b))
                v = verdict(ours, theirs, tol) if theirs is not None else "—"
                r = verdict(ours, rand, tol)
                counts[v] += 1
                counts["cells"] += theirs is not None
                counts["random_cells"] += 1
                counts["beats_random"] += r == "win"
                out.append(f"| {problem} | {b} | {fmt(ours)} | {fmt(theirs)} | {v} | {fmt(rand)} | {'better' if r == 'win' else r} |")
        summary[name] = counts
        out.append("")
    return out, summary


def summary_table(summary) -> list[str]:
    out = ["| kubetune | Optuna counterpart | cells | wins | ties | losses | at least as good | better than random |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in KUBETUNE:
        c = summary[name]
        n = c["cells"]
        good = (c["win"] + c["tie"]) / n if n else float("nan")
        br = c["beats_random"] / c["random_cells"] if c["random_cells"] else float("nan")
        rand_col = "—" if name == "random" else f"{br:.0%} ({c['beats_random']}/{c['random_cells']})"
        out.append(f"| {name} | {COUNTERPART[name]} | {n} | {c['win']} | {c['tie']} | {c['loss']} | {good:.0%} | {rand_col} |")
    return out


def latency_section(cfg) -> list[str]:
    ns = sorted(cfg["latency"])
    head = "| sampler | " + " | ".join(f"kubetune @{n:,} | Optuna @{n:,} | speed-up @{n:,}" for n in ns) + " |"
    out = ["ms per ask (median) with N random completed trials in a 5-D box, same process, one BLAS thread;",
           "a long-lived sampler (kubetune's cache warm, Optuna's in-memory study).", "",
           head, "| --- |" + " ---: | ---: | ---: |" * len(ns)]
    fresh = []
    for name in ["tpe", "cmaes", "gp", "random"]:
        row = [name]
        for n in ns:
            kt_asks = cfg["kubetune_gp_latency"].get(n) if name == "gp" else cfg["latency"][n]
            op_asks = cfg["optuna_gp_latency"].get(n) if name == "gp" else cfg["latency"][n]
            kt = runners.latency_kubetune(name, n, kt_asks) if kt_asks else None
            op = runners.latency_optuna(name, n, op_asks) if op_asks else None
            row += [fmt(kt["ms"]) if kt else "—", fmt(op["ms"]) if op else "skipped (hours)",
                    f"{op['ms'] / kt['ms']:.1f}x" if kt and op else "—"]
            if kt:
                fresh.append(f"{name} @{n:,}: {fmt(kt['first_ms'])} ms")
            print(f"latency {name} n={n}: kubetune {kt} optuna {op}", file=sys.stderr, flush=True)
        out.append("| " + " | ".join(row) + " |")
    out += ["", "First ask of a fresh kubetune sampler (encodes every trial; cmaes replays all generations): "
            + "; ".join(fresh) + "."]
    return out


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        model = platform.processor() or "unknown"
    import optuna

    return (f"{os.cpu_count()} vCPU ({model}), Python {platform.python_version()}, numpy {np.__version__}, "
            f"Optuna {optuna.__version__}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--log", help="append each finished run to this JSON-lines file, and skip runs already in it")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.time()
    jobs = jobs_for(cfg)
    done = []
    if args.log and os.path.exists(args.log):
        with open(args.log) as f:
            done = [json.loads(line, parse_constant=float) for line in f if line.strip()]
    finished = {tuple(d["job"]) for d in done}
    todo = [j for j in jobs if tuple(j) not in finished]
    log = open(args.log, "a") if args.log else None
    results, warm, took = {}, [], defaultdict(float)

    def record(job, res):
        if res[0] == "quality":
            _, key, curve, seconds = res
            results[tuple(key)] = curve
            took[(key[0], key[1])] += seconds
        else:
            warm.append(tuple(res))

    for d in done:
        record(d["job"], d["result"])
    with Pool(args.procs) as pool:
        for i, (job, res) in enumerate(pool.imap_unordered(dispatch_keyed, todo), 1):
            record(job, res)
            if log:
                log.write(json.dumps({"job": list(job), "result": _plain(res)}) + "\n")
                log.flush()
            if i % 25 == 0 or i == len(todo):
                print(f"{i}/{len(todo)} jobs, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    from .warm_start import warm_table

    tables, summary = quality_tables(cfg, results)
    lines = ["## Samplers", "",
             f"Command: `python -m bench.samplers{' --quick' if args.quick else ''}` "
             f"({args.procs} processes over seeds). Machine: {machine()}.", "",
             f"Problems: {', '.join(cfg['problems'])}. Seeds 0-{cfg['seeds'] - 1} for every sampler; "
             f"budgets {', '.join(map(str, cfg['budgets']))} (median best value, lower is better).",
             "Every sampler runs with its library's defaults (Optuna 5's TPE is multivariate with a constant liar; "
             "its CMA-ES samples categorical and conditional parameters at random, its GP conditional ones).",
             "Ties: medians within 1e-3 x max(1, |optimum|).", "",
             "### Summary", ""] + summary_table(summary) + [""]
    lines += ["### Warm start (shifted functions)", ""] + warm_table(warm) + [""]
    lines += ["### Suggestion latency", ""] + latency_section(cfg) + [""]
    lines += ["### Cells", ""] + tables
    cpu = ", ".join(f"{lib} {name} {s:.0f} s" for (lib, name), s in sorted(took.items()))
    lines += [f"Total wall time {time.time() - started:.0f} s. CPU time of the optimisation runs: {cpu}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
