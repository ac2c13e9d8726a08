"""Schedulers on recorded learning curves, replayed with simulated time.

    python -m bench.schedulers            # full: 100 seeds, 4 and 16 workers
    python -m bench.schedulers --quick    # 10 seeds, 4 workers
    python -m bench.schedulers --workers 8 --methods none   # the checked rows only, 8 workers

Each method runs on N simulated workers: a worker trains one epoch of a
configuration in the time that epoch took when it was recorded, reports the
validation accuracy, and does what the scheduler says. Configurations come
from the table in a random order per seed (the same order for every method),
so every method sees the same configurations and differs only in how it
spends epochs. A run has a budget of 3000 epochs, and goes on past it until it
reaches the targets.

Measured: epochs and simulated seconds until some report reaches the target
(the accuracy that about 3% of the configurations reach), as the mean over seeds
(the expected cost) and the median, and the regret at the budget (best accuracy
in the table minus the best one finished).

The peers are driven directly, inside the same event loop: Ray Tune's
AsyncHyperBandScheduler objects (on_trial_add / on_trial_result with stub
trials; running real Tune for thousands of one-epoch steps would measure Ray's
overheads, not the scheduling), and Optuna's pruners through an in-memory
optuna study (ask / report / should_prune / tell).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubetune import Study  # noqa: E402
from kubetune.api.space import SearchSpace  # noqa: E402
from kubetune.suggestion import SAMPLERS  # noqa: E402
from kubetune.suggestion.base import SEED, Sampler  # noqa: E402
from kubetune.suggestion.bohb import BOHBSampler  # noqa: E402

DATA = Path(__file__).parent / "data" / "mlp_digits_curves.npz"
EPOCHS = 27
RUNGS = {"resource": "epoch", "min": 1, "max": EPOCHS, "reductionFactor": 3}


# -- the tables ------------------------------------------------------------------


@dataclass
class Table:
    name: str
    space_spec: list
    configs: list[dict]
    acc: np.ndarray  # [configs, epochs]
    secs: np.ndarray  # [configs, epochs]

    def __post_init__(self):
        self.space = SearchSpace.from_spec(self.space_spec)
        self.row = {}
        for i, c in enumerate(self.configs):
            self.row.setdefault(self.space.key(self.space.canonical(c)), i)
        # Two readings of "a value about 3% of random configurations reach": their final
        # value (after the full budget), or their best value at any epoch.
        self.target = float(np.quantile(self.acc[:, -1], 0.97))
        self.target_any = float(np.quantile(self.acc.max(axis=1), 0.97))
        self.best = float(self.acc[:, -1].max())


def mlp_table() -> Table:
    d = np.load(DATA)
    return Table("MLP on digits (recorded)", json.loads(str(d["space"])), json.loads(str(d["configs"])),
                 d["acc"].astype(float), d["secs"].astype(float))


def synthetic_table(n=2000, seed=0) -> Table:
    """A multi-fidelity function whose early ranking misleads somewhat: fast learners
    are not always the best (rate and final quality are only loosely tied)."""
    spec = [{"name": f"x{i}", "type": "double", "min": 0.0, "max": 1.0} for i in range(4)]
    rng = np.random.default_rng(seed)
    x = rng.random((n, 4))
    centres = np.array([[0.2, 0.7, 0.4, 0.5], [0.8, 0.3, 0.6, 0.2], [0.5, 0.5, 0.9, 0.8]])
    heights = np.array([0.95, 0.85, 0.8])
    q = (heights * np.exp(-((x[:, None, :] - centres) ** 2).sum(-1) / 0.08)).max(1)
    rate = 0.04 + 0.4 * x[:, 3] * (0.5 + 0.5 * rng.random(n))
    e = np.arange(1, EPOCHS + 1)
    noise = 0.01 * rng.standard_normal((n, EPOCHS))
    acc = np.clip(q[:, None] * (1 - np.exp(-rate[:, None] * e)) + noise, 0, 1)
    secs = np.repeat((0.5 + x[:, 2:3]), EPOCHS, axis=1)  # some configurations train slower
    configs = [{f"x{i}": float(v) for i, v in enumerate(row)} for row in x]
    return Table("synthetic multi-fidelity function", spec, configs, acc, secs)


# -- samplers that draw the table's configurations ----------------------------------

TABLE: Table | None = None


class TableSampler(Sampler):
    """The table's configurations in a random order fixed by the seed (cycling when used up)."""

    name = "table"
    SETTINGS = {"seed": SEED}

    def order(self):
        return np.random.default_rng(self.seed).permutation(len(TABLE.configs))

    def ask(self, trials):
        if not hasattr(self, "_order"):
            self._order = self.order()
        return TABLE.configs[self._order[len(trials) % len(TABLE.configs)]]


class TableBOHB(BOHBSampler):
    """kubetune's `bohb` model choosing among the table's configurations. The replay can only run
    recorded configurations, so instead of drawing candidates from the good density it ranks up to
    400 untried table rows by the same good/bad ratio; the model itself (the largest budget with
    enough observations, the good fraction, the densities, the random fraction) is BOHBSampler's."""

    name = "table-bohb"

    def ask(self, trials):
        rng = self.rng(trials)
        model = None if rng.random() < self.settings["randomFraction"] else self.model(trials)
        if model is None:
            return TableSampler.ask(self, trials)
        good, bad = model
        tried = {self.space.key(t.params) for t in trials}
        rows = [i for i in rng.permutation(len(TABLE.configs))[:400]
                if self.space.key(self.space.canonical(TABLE.configs[i])) not in tried]
        if not rows:
            return TableSampler.ask(self, trials)
        enc = self.encoder
        cand = np.array([enc.row(TABLE.configs[i]) for i in rows])
        active, cells = enc.active(cand), enc.cells(cand)
        score = good.log_pdf_joint(cand, active, cells) - bad.log_pdf_joint(cand, active, cells)
        return TABLE.configs[rows[int(np.argmax(score))]]

    order = TableSampler.order


SAMPLERS["table"] = TableSampler
SAMPLERS["table-bohb"] = TableBOHB


# -- methods: what a free worker runs and what a report means ------------------------


class KubetuneMethod:
    def __init__(self, early_stopping, seed, sampler="table"):
        self.study = Study(parameters=TABLE.space_spec, algorithm={"name": sampler, "settings": {"seed": seed}},
                           goal="maximize", early_stopping=early_stopping, seed=seed)

    def start(self):
        t = self.study.ask()
        return TABLE.row[self.study.space.key(t.params)], int(t.last_step or 0), t

    def report(self, t, epoch, value):
        return self.study.report(t, step=epoch, value=value).action

    def done(self, t, value):
        self.study.tell(t, value)


class RayASHA:
    def __init__(self, brackets, seed):
        from ray.tune.schedulers import AsyncHyperBandScheduler

        np.random.seed(seed)  # Ray draws brackets from numpy's global generator
        self.s = AsyncHyperBandScheduler(time_attr="epoch", metric="acc", mode="max", max_t=EPOCHS,
                                         grace_period=1, reduction_factor=3, brackets=brackets)
        self.order = np.random.default_rng(seed).permutation(len(TABLE.configs))
        self.n = 0

    def start(self):
        class T:  # what Ray's ASHA reads of a trial
            def __init__(self, i):
                self.trial_id = str(i)

        t = T(self.n)
        self.n += 1
        self.s.on_trial_add(None, t)
        return int(self.order[(self.n - 1) % len(self.order)]), 0, t

    def report(self, t, epoch, value):
        action = self.s.on_trial_result(None, t, {"epoch": epoch, "acc": value})
        return "stop" if action == "STOP" else "continue"

    def done(self, t, value):
        self.s.on_trial_complete(None, t, {"epoch": EPOCHS, "acc": value})


class OptunaPruner:
    def __init__(self, kind, seed):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
                  if kind == "sha" else
                  optuna.pruners.HyperbandPruner(min_resource=1, max_resource=EPOCHS, reduction_factor=3))
        self.study = optuna.create_study(direction="maximize", pruner=pruner,
                                         sampler=optuna.samplers.RandomSampler(seed=seed))
        self.order = np.random.default_rng(seed).permutation(len(TABLE.configs))
        self.n = 0
        self.pruned = set()

    def start(self):
        t = self.study.ask()
        self.n += 1
        return int(self.order[(self.n - 1) % len(self.order)]), 0, t

    def report(self, t, epoch, value):
        t.report(value, epoch)
        if t.should_prune():
            self.pruned.add(t.number)
            return "stop"
        return "continue"

    def done(self, t, value):
        import optuna

        if t.number in self.pruned:
            self.study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(t, value)


# -- the simulated cluster ----------------------------------------------------------------


def simulate(method, workers: int, epoch_budget: int, cap: int = 50_000):
    """Event loop over simulated time. Returns a dict: epochs and seconds until a trial
    finished the full budget at or above the target, the same for any report at or above
    target_any, regret of the best trial finished within `epoch_budget` epochs, and the
    share of idle worker time then.

    The run goes on past `epoch_budget` until both targets are reached (at most `cap`
    epochs): a run cut off before the target would drop exactly the unlucky orderings
    from the epochs-to-target numbers, and random search is the method with the longest
    tail (a geometric number of configurations until the first good one)."""
    clock, epochs, best = 0.0, 0, -math.inf
    at_budget = None  # (best, idle) when the budget was spent
    hit = {"final": (None, None), "any": (None, None)}
    events = []  # (finish time, seq, worker, row, epoch, handle)
    seq = 0
    busy = 0.0

    def launch(w, now):
        nonlocal seq
        row, start, handle = method.start()
        heapq.heappush(events, (now + TABLE.secs[row, start], seq, w, row, start + 1, handle))
        seq += 1

    for w in range(workers):
        launch(w, 0.0)
    while events and epochs < cap:
        if epochs >= epoch_budget:
            if at_budget is None:
                at_budget = (best, 1 - busy / max(clock * workers, 1e-9))
            if hit["final"][0] is not None and hit["any"][0] is not None:
                break
        now, _, w, row, epoch, handle = heapq.heappop(events)
        busy += TABLE.secs[row, epoch - 1]
        clock = now
        epochs += 1
        value = float(TABLE.acc[row, epoch - 1])
        if hit["any"][0] is None and value >= TABLE.target_any:
            hit["any"] = (epochs, now)
        if epoch == EPOCHS:
            best = max(best, value)
            if hit["final"][0] is None and value >= TABLE.target:
                hit["final"] = (epochs, now)
            method.done(handle, value)
            launch(w, now)
            continue
        action = method.report(handle, epoch, value)
        if action in ("stop", "pause"):
            if action == "stop":
                method.done(handle, value)
            launch(w, now)
        else:
            heapq.heappush(events, (now + TABLE.secs[row, epoch], seq, w, row, epoch + 1, handle))
            seq += 1
    if at_budget is None:
        at_budget = (best, 1 - busy / max(clock * workers, 1e-9))
    return {**hit, "regret": TABLE.best - at_budget[0], "idle": at_budget[1]}


# The rows the targets are checked on: always run.
CHECKED = ("random search (full budget)", "kubetune ASHA", "Ray Tune ASHA", "Optuna SuccessiveHalvingPruner")


def methods():
    asha = {"name": "asha", "settings": RUNGS}
    return {
        "random search (full budget)": lambda s: KubetuneMethod(None, s),
        "kubetune ASHA": lambda s: KubetuneMethod(asha, s),
        "kubetune ASHA, promotion": lambda s: KubetuneMethod({"name": "asha", "settings": {**RUNGS, "mode": "promotion"}}, s),
        "kubetune HyperBand (sync)": lambda s: KubetuneMethod({"name": "hyperband", "settings": RUNGS}, s),
        "kubetune HyperBand (async)": lambda s: KubetuneMethod(
            {"name": "hyperband", "settings": {**RUNGS, "mode": "asynchronous"}}, s),
        "kubetune BOHB": lambda s: KubetuneMethod({"name": "bohb", "settings": RUNGS}, s, sampler="table-bohb"),
        "kubetune median stopping": lambda s: KubetuneMethod({"name": "median", "settings": {"startupTrials": 5}}, s),
        "Ray Tune ASHA": lambda s: RayASHA(1, s),
        "Ray Tune async HyperBand (4 brackets)": lambda s: RayASHA(4, s),
        "Optuna SuccessiveHalvingPruner": lambda s: OptunaPruner("sha", s),
        "Optuna HyperbandPruner": lambda s: OptunaPruner("hyperband", s),
    }


def run_table(table: Table, seeds: int, workers: int, epoch_budget: int, only: list[str] | None = None):
    global TABLE
    TABLE = table
    rows = []
    for name, make in methods().items():
        if only and name not in CHECKED and not any(o.lower() in name.lower() for o in only):
            continue
        res = []
        t0 = time.perf_counter()
        for seed in range(seeds):
            res.append(simulate(make(seed), workers, epoch_budget))
        cpu = time.perf_counter() - t0
        row = {"method": name, "cpu": cpu, "regret": float(np.median([r["regret"] for r in res])),
               "idle": float(np.mean([r["idle"] for r in res]))}
        for kind in ("final", "any"):
            e = np.array([np.nan if r[kind][0] is None else r[kind][0] for r in res], dtype=float)
            t = np.array([np.nan if r[kind][1] is None else r[kind][1] for r in res], dtype=float)
            ok = np.isfinite(e)
            row[kind] = {"reached": f"{int(ok.sum())}/{seeds}", "all": bool(ok.all()),
                         "per_seed": e, "time_per_seed": t,
                         "epochs": float(np.mean(e[ok])) if ok.any() else None,
                         "median": float(np.median(e[ok])) if ok.any() else None,
                         "time": float(np.mean(t[ok])) if ok.any() else None,
                         "time_median": float(np.median(t[ok])) if ok.any() else None}
        rows.append(row)
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def expected_random(table: Table, kind: str) -> float:
    """Expected epochs of random search on one worker until the target: the configurations
    come without replacement, so the first of k good ones among n is at (n+1)/(k+1)."""
    good = (table.acc[:, -1] >= table.target) if kind == "final" else (table.acc.max(axis=1) >= table.target_any)
    k, n = int(good.sum()), len(good)
    if kind == "final":
        return EPOCHS * (n + 1) / (k + 1)
    # any report: every configuration before the first good one costs EPOCHS, the good one
    # costs the epochs until it first reaches target_any (its average over the good ones)
    first = [int(np.argmax(row >= table.target_any)) + 1 for row in table.acc[good]]
    return EPOCHS * ((n + 1) / (k + 1) - 1) + float(np.mean(first))


def report(table, rows, workers, budget, seeds):
    n = len(table.configs)
    k_final = int((table.acc[:, -1] >= table.target).sum())
    k_any = int((table.acc.max(axis=1) >= table.target_any).sum())
    out = [f"\n### {table.name}: {workers} workers, {seeds} seeds, {budget} epochs per run\n",
           f"Targets: final accuracy {table.target:.4f} (the 97th percentile of the {n} configurations' final "
           f"accuracy; {k_final} of {n} reach it), any-epoch accuracy {table.target_any:.4f} (97th percentile of their "
           f"best epoch; {k_any} of {n}); best final accuracy in the table {table.best:.4f}. \"Finished\": a trial "
           "trained to the full budget ends at or above the target (what the user gets: a fully trained model); "
           "\"any report\": some report, at any epoch, is at or above target_any. Epochs and simulated seconds to the "
           "target: mean (the expected cost) and median over seeds; every run goes on past the budget until it "
           "reaches both targets, so no unlucky seed is left out. Regret and idle share: at the budget. "
           f"Random search on one worker is expected to need {expected_random(table, 'final'):.0f} epochs (finished) "
           f"and {expected_random(table, 'any'):.0f} (any report) on this table (exact, no simulation).\n",
           "| method | finished: reached | epochs mean | median | sim. s mean | median | any report: epochs mean | "
           "median | sim. s mean | median | regret at budget (median) | idle workers | replay CPU s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, a = r["final"], r["any"]
        out.append(f"| {r['method']} | {f['reached']} | {fmt(f['epochs'], '.0f')} | {fmt(f['median'], '.0f')} | "
                   f"{fmt(f['time'], '.2f')} | {fmt(f['time_median'], '.2f')} | {fmt(a['epochs'], '.0f')} | "
                   f"{fmt(a['median'], '.0f')} | {fmt(a['time'], '.2f')} | {fmt(a['time_median'], '.2f')} | "
                   f"{r['regret']:.4f} | {100 * r['idle']:.0f}% | {r['cpu']:.1f} |")
    return "\n".join(out)


def ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = 2000) -> tuple[float, float]:
    """90% bootstrap interval of mean(num) / mean(den), resampling seeds (paired)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(len(num), size=(reps, len(num)))
    r = num[idx].mean(axis=1) / den[idx].mean(axis=1)
    return float(np.quantile(r, 0.05)), float(np.quantile(r, 0.95))


def checks(rows):
    by = {r["method"]: r for r in rows}
    a, rs = by["kubetune ASHA"], by["random search (full budget)"]
    osha, ray = by["Optuna SuccessiveHalvingPruner"], by["Ray Tune ASHA"]
    lines = []

    def line(ok, text):
        lines.append(f"- [{'met' if ok else 'MISSED'}] {text}")

    for kind, label in (("final", "finished trial"), ("any", "any report")):
        A, R, O, Y = a[kind], rs[kind], osha[kind], ray[kind]
        if not (A["all"] and R["all"] and O["all"] and Y["all"]):
            lines.append(f"- ({label}) not every seed reached the target within the cap: no check")
            continue
        lo, hi = ratio_ci(A["per_seed"], R["per_seed"])
        ratio = A["epochs"] / R["epochs"]
        line(ratio <= 1 / 3, f"({label}) ASHA expected epochs to target {A['epochs']:.0f} <= 1/3 of random "
             f"search's {R['epochs']:.0f} -- ratio {ratio:.3f} (90% bootstrap interval {lo:.3f}-{hi:.3f}; "
             f"ratio of medians {A['median'] / R['median']:.3f})")
        line(A["epochs"] <= O["epochs"], f"({label}) ASHA epochs {A['epochs']:.0f} <= Optuna "
             f"SuccessiveHalvingPruner's {O['epochs']:.0f} (means)")
        lo, hi = ratio_ci(A["time_per_seed"], Y["time_per_seed"])
        line(A["time"] <= Y["time"], f"({label}) ASHA simulated time {A['time']:.3f} s <= Ray Tune ASHA's "
             f"{Y['time']:.3f} s (means; ratio {A['time'] / Y['time']:.3f}, 90% interval {lo:.3f}-{hi:.3f}; "
             f"medians {A['time_median']:.3f} vs {Y['time_median']:.3f} s)")
    return "\n".join(lines)


def survival(table: Table) -> str:
    """Why ASHA's saving is bounded on a table: an idealised successive halving that keeps the
    table-wide top 1/3 at epochs 1, 3 and 9 spends 3 epochs per configuration, but only the
    target configurations that survive all three rungs can be found by it."""
    acc = table.acc
    good = acc[:, -1] >= table.target
    keep = np.ones(len(acc), bool)
    cost = 1.0
    lines = [f"{table.name}: {int(good.sum())} of {len(acc)} configurations reach the final target {table.target:.4f}"]
    for rung, nxt in ((1, 3), (3, 9), (9, EPOCHS)):
        cut = np.quantile(acc[keep, rung - 1], 1 - 1 / 3)
        keep &= acc[:, rung - 1] >= cut
        cost += (nxt - rung) * keep.mean()
        lines.append(f"  top third at epoch {rung} (of those still in): {int((good & keep).sum())} of them remain")
    k, n = int((good & keep).sum()), len(acc)
    sha = cost * (n + 1) / (k + 1)
    rnd = EPOCHS * (n + 1) / (int(good.sum()) + 1)
    lines.append(f"  idealised SHA, one worker: {cost:.2f} epochs per configuration, about {sha:.0f} epochs expected "
                 f"until a surviving good configuration is trained to the end, vs random search's {rnd:.0f}: "
                 f"ratio about {sha / rnd:.2f}")
    return "\n".join(lines)


class FastestGood:
    """A lower bound, not a method: the first launch is the target-reaching configuration whose 27
    epochs take the least time (as if an oracle knew it), every other launch a random configuration
    trained in full. Counts what the other workers train while it runs."""

    def __init__(self, seed):
        self.order = np.random.default_rng(seed).permutation(len(TABLE.configs))
        good = np.flatnonzero(TABLE.acc[:, -1] >= TABLE.target)
        self.first = int(min(good, key=lambda i: TABLE.secs[i].sum()))
        self.n = 0

    def start(self):
        self.n += 1
        row = self.first if self.n == 1 else int(self.order[(self.n - 1) % len(self.order)])
        return row, 0, None

    def report(self, t, epoch, value):
        return "continue"

    def done(self, t, value):
        pass


def floors(table: Table, seeds: int = 100) -> str:
    global TABLE
    TABLE = table
    out = []
    for workers in (1, 4, 8, 16):
        e = [simulate(FastestGood(s), workers, 0)["final"][0] for s in range(seeds)]
        out.append(f"  oracle floor, {workers} workers: {np.mean(e):.0f} epochs to the finished target (mean of {seeds})")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--out", help="write the Markdown here too")
    ap.add_argument("--methods", help="comma-separated parts of method names to run besides the four the "
                    "targets are checked on (random search, kubetune ASHA, Ray Tune ASHA, Optuna SHA); "
                    "default: all", type=lambda v: [x for x in v.split(",") if x])
    ap.add_argument("--workers", help="comma-separated worker counts (default 4,16; --quick: 4)",
                    type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--survival", action="store_true", help="only print how many target configurations an "
                    "idealised successive halving keeps at each rung, and the oracle floor of epochs to target")
    a = ap.parse_args()
    if a.survival:
        print("\n".join(survival(t) + "\n" + floors(t) for t in (mlp_table(), synthetic_table())))
        return
    seeds = a.seeds or (10 if a.quick else 100)
    text = []
    for table in (mlp_table(), synthetic_table()):
        for workers in a.workers or ((4,) if a.quick else (4, 16)):
            budget = 3000
            rows = run_table(table, seeds, workers, budget, a.methods)
            block = report(table, rows, workers, budget, seeds) + "\n\n" + checks(rows)
            print(block, flush=True)
            text.append(block)
    if a.out:
        Path(a.out).write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
