"""Which stopping rule should ASHA use? The paper's rank rule against the lenient alternatives.

    python -m bench.asha_rules               # 100 seeds, MLP and synthetic tables, 4 and 16 workers
    python -m bench.asha_rules --seeds 20    # quicker

Every variant runs the same replay as bench.schedulers (same tables, orders,
rungs 1/3/9/27, reduction factor 3) and is compared, seed for seed, with the
three rows the issue's targets name: random search (epochs, want <= 1/3),
Optuna's SuccessiveHalvingPruner (epochs, want <= 1) and Ray Tune's ASHA
(simulated time, want <= 1). Ratios of means, with the paired 90% bootstrap
interval. The variants only replace RungScheduler.cutoff (and, for the re-judged one,
ASHA.on_report) in this process.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from kubetune.api.trial import CONTINUE, Decision
from kubetune.schedulers.asha import ASHA
from kubetune.schedulers.rungs import RungScheduler

from . import schedulers as S

PAPER = RungScheduler.cutoff


def paper(self, rung):
    """Top max(1, floor(n/eta)), own value included (kubetune's rule, and Optuna's)."""
    return PAPER(self, rung)


def judge_from_eta(self, rung):
    """As the paper, but a rung with fewer than eta values cannot judge yet: everyone goes on."""
    return math.inf if len(rung) < self.eta else PAPER(self, rung)


def top_ceil(self, rung):
    """Top ceil(n/eta): the interpolated (1 - 1/eta) percentile that Ray's rule approximates."""
    ranked = sorted(rung.values())
    return ranked[max(1, math.ceil(len(ranked) / self.eta)) - 1]


PAPER_REPORT = ASHA.on_report


def rejudging(self, trial, step, value, trials):
    """At every report, every rung the trial has passed judges it again with the values there now: a
    trial let through while its rung held few values stops once later arrivals rank it out."""
    self.sync(trials, holdback=trial)
    self._ingest(trial, len(trial.intermediate))
    last = len(self.milestones(0)) - 1
    for k in range(min(self.top_rung(trial) + 1, last)):
        rung = self.rung(0, k)
        if rung[trial.number] > self.cutoff(rung):
            return Decision("stop", f"out of the top 1/eta at rung {k}")
    return CONTINUE


RULES = {"paper rank rule (kubetune, Optuna)": (paper, False), "judge only from eta values on": (judge_from_eta, False),
         "top ceil(n/eta)": (top_ceil, False), "top ceil(n/eta), re-judged at every report": (top_ceil, True)}
PEERS = ("random search (full budget)", "Optuna SuccessiveHalvingPruner", "Ray Tune ASHA")


def per_seed(make, seeds: int, workers: int) -> dict:
    res = [S.simulate(make(s), workers, 3000) for s in range(seeds)]
    return {k: (np.array([r[k][0] for r in res], float), np.array([r[k][1] for r in res], float))
            for k in ("final", "any")}


def ratio(num, den) -> str:
    lo, hi = S.ratio_ci(num, den)
    return f"{num.mean() / den.mean():.3f} ({lo:.3f}-{hi:.3f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=100)
    a = ap.parse_args()
    asha = {"name": "asha", "settings": S.RUNGS}
    print("| table | workers | rule | target | epochs / random | epochs / Optuna SHA | time / Ray ASHA |")
    print("|---|---:|---|---|---:|---:|---:|")
    for table in (S.mlp_table(), S.synthetic_table()):
        S.TABLE = table
        for workers in (4, 16):
            peers = {name: per_seed(S.methods()[name], a.seeds, workers) for name in PEERS}
            for label, (rule, rejudge) in RULES.items():
                RungScheduler.cutoff = rule
                ASHA.on_report = rejudging if rejudge else PAPER_REPORT
                try:
                    mine = per_seed(lambda s: S.KubetuneMethod(asha, s), a.seeds, workers)
                finally:
                    RungScheduler.cutoff, ASHA.on_report = PAPER, PAPER_REPORT
                for kind in ("final", "any"):
                    e, t = mine[kind]
                    print(f"| {table.name.split(' (')[0]} | {workers} | {label} | {kind} | "
                          f"{ratio(e, peers[PEERS[0]][kind][0])} | {ratio(e, peers[PEERS[1]][kind][0])} | "
                          f"{ratio(t, peers[PEERS[2]][kind][1])} |", flush=True)


if __name__ == "__main__":
    main()
