"""PBT against the same population trained with fixed hyperparameters.

    python -m bench.pbt [--seeds 10] [--e2e-seeds 2]
    python -m bench.pbt --quick            # 3 seeds, one end-to-end run

The experiment is `examples/pbt.yaml` (population, parameters, objective, PBT
settings, epochs) and the networks are those of its trainer,
`trial_image/trainers/digits_torch.py` (same data, model, initial weights,
optimizer and epoch), in two ways:

1. Generation by generation, in this process (the measurement): in each
   generation every member trains one epoch and reports to the kubetune Study
   (in an order shuffled per generation) and follows its decision; an exploit
   copies the donor's current weights and optimizer state and goes on from the
   donor's epoch, as the trainer does. No model is trained more than EPOCHS
   epochs; the populations' total epochs are shown (PBT's can differ by a few:
   a trial that takes a donor one epoch behind trains one more). Both start
   from the same configurations (the `random` sampler with the same seed), in
   lockstep, so only the scheduler differs.
2. End to end, as a user runs it (`kubetune run`, one process per trial,
   checkpoints copied and verified on disk), PBT and fixed. Here the members
   start seconds apart on a small machine while an epoch takes milliseconds.
   With the example's `synch: true` each check waits until the whole population
   has reported that epoch, so members are compared (and take donors) at the
   same epoch as in process; with the asynchronous default (`--e2e-async`) they
   are compared at very different epochs.

For each seed: the best and mean final validation loss (the objective) and the
best final validation accuracy of each population, and the lineage of PBT's
best trial. In process, the validation digits are halved: trials report on the
first half (and PBT selects on it); the trial each method ends with as its best
is then scored on the second half, which no decision saw.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pbt.yaml"
TRAINER = ROOT / "trial_image" / "trainers" / "digits_torch.py"


def load_trainer():
    spec = importlib.util.spec_from_file_location("digits_torch", TRAINER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example() -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    env = {e["name"]: e["value"] for e in doc["spec"]["trialTemplate"].get("env", [])}
    return {"doc": doc, "epochs": int(env.get("EPOCHS", 20)), "hidden": int(env.get("HIDDEN", 64))}


# -- 1. generation by generation ----------------------------------------------------


def run_in_process(tr, ex: dict, seed: int, pbt: bool, method: str = "pbt") -> dict:
    import torch

    from kubetune import Study

    spec = ex["doc"]["spec"]
    metric, goal = spec["objective"]["metric"], spec["objective"]["goal"]
    es = {**spec["earlyStopping"], "name": method} if pbt else None
    study = Study(parameters=spec["parameters"], algorithm={"name": "random", "settings": {"seed": seed}},
                  goal=goal, early_stopping=es, seed=seed)
    device = torch.device("cpu")
    X, y, train, val = tr.load_data(device)
    # The trainer's 597 validation digits, halved: the first half is what trials report (and PBT
    # selects on), the second is only used at the end to score the trial each method picks.
    data, test = (X, y, train, val[: len(val) // 2]), (X, y, train, val[len(val) // 2:])
    members = []
    for _ in range(spec["budget"]["maxTrials"]):
        t = study.ask()
        model, optimizer = tr.build({**t.params, "hidden": ex["hidden"]}, device)
        members.append({"trial": t, "model": model, "optimizer": optimizer, "age": 0,
                        "g": torch.Generator().manual_seed(0)})
    rng = np.random.default_rng([seed, 1])
    epochs_trained = 0
    # Generations: each member not yet at EPOCHS trains one epoch and reports at once (in an
    # order shuffled per generation). An exploit copies the donor's current weights and
    # optimizer state and goes on from the donor's epoch, as the trainer does.
    while any(m["age"] < ex["epochs"] for m in members):
        for i in rng.permutation(len(members)):
            m = members[i]
            if m["age"] >= ex["epochs"]:
                continue
            tr.train_epoch(m["model"], m["optimizer"], data, m["g"])
            epochs_trained += 1
            m["age"] += 1
            m["acc"], m["loss"] = tr.evaluate(m["model"], data)
            values = {"val_loss": m["loss"], "val_accuracy": m["acc"]}
            d = study.report(m["trial"], step=m["age"], value=values[metric],
                             **{k: v for k, v in values.items() if k != metric})
            # With `synch: true` a check is answered `wait` until the generation has reported it;
            # the held decisions come out of released() (in a generation, when its last member reports).
            decided = [] if d.wait else [(m, d)]
            decided += [(next(x for x in members if x["trial"] is t), h) for t, h in study.released()]
            for x, h in decided:
                if h.action == "exploit":
                    donor = next(y for y in members if y["trial"].number == h.donor)
                    x["model"].load_state_dict(copy.deepcopy(donor["model"].state_dict()))
                    x["optimizer"].load_state_dict(copy.deepcopy(donor["optimizer"].state_dict()))
                    tr.set_hyperparameters(x["optimizer"], h.params)
                    x["age"] = donor["age"]
    # A trial's result is its last report (the objective's strategy: latest), as in the trainer:
    # one that exploits at its last epoch ends with the donor's weights but its own last value.
    for m in members:
        study.tell(m["trial"], m["loss"] if metric == "val_loss" else m["acc"])
    best = study.best_trial
    chosen = next(m for m in members if m["trial"].number == best.number)
    test_acc, test_loss = tr.evaluate(chosen["model"], test)
    return {"loss": [m["loss"] for m in members], "acc": [m["acc"] for m in members], "study": study,
            "test_loss": test_loss, "test_acc": test_acc,
            "epochs": epochs_trained, "exploits": sum(1 for m in members for e in m["trial"].events
                                                      if e["event"] == "exploit")}


# -- 2. end to end ------------------------------------------------------------------------


def run_cli(doc: dict, work: Path) -> dict:
    path = work / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(path), "--json", "--quiet",
                          "--state-dir", str(work / "state")], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    summary = json.loads(out.stdout)
    records = [json.loads(line) for line in
               (work / "state" / doc["metadata"]["name"] / "trials.jsonl").read_text().splitlines()]
    done = [r for r in records if r["state"] == "Succeeded"]
    summary["loss"] = [r["metrics"].get("val_loss", r["value"]) for r in done]
    summary["acc"] = [r["metrics"].get("val_accuracy") for r in done]
    summary["epochs"] = sum(len(r["intermediate"]) for r in records)
    return summary


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table(rows, name="PBT") -> list[str]:
    held = "test_loss" in rows[0][1]
    extra = f" fixed: its test loss | {name}: its test loss |" if held else ""
    out = [f"| seed | fixed: best val loss | {name}: best val loss | fixed: mean | {name}: mean | fixed: best accuracy "
           f"| {name}: best accuracy |{extra} epochs (fixed / {name}) | exploits |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if held else "") + " ---: | ---: |"]
    for seed, f, p in rows:
        cells = f" {f['test_loss']:.4f} | {p['test_loss']:.4f} |" if held else ""
        out.append(f"| {seed} | {min(f['loss']):.4f} | {min(p['loss']):.4f} | {statistics.mean(f['loss']):.4f} | "
                   f"{statistics.mean(p['loss']):.4f} | {max(f['acc']):.4f} | {max(p['acc']):.4f} |{cells} "
                   f"{f['epochs']} / {p['epochs']} | {p['exploits']} |")
    loss_wins = sum(1 for _, f, p in rows if min(p["loss"]) < min(f["loss"]))
    acc_wins = sum(1 for _, f, p in rows if max(p["acc"]) > max(f["acc"]))
    acc_ties = sum(1 for _, f, p in rows if max(p["acc"]) == max(f["acc"]))
    gap = [min(f["loss"]) - min(p["loss"]) for _, f, p in rows]
    out.append("")
    out.append(f"{name}'s best val loss below the best fixed trial's in {loss_wins} of {len(rows)} seeds "
               f"(mean improvement {statistics.mean(gap):.4f}, median {statistics.median(gap):.4f}); "
               f"{name}'s best accuracy above the best fixed trial's in {acc_wins} of {len(rows)} "
               f"(equal in {acc_ties}).")
    if held:
        test_wins = sum(1 for _, f, p in rows if p["test_loss"] < f["test_loss"])
        tgap = [f["test_loss"] - p["test_loss"] for _, f, p in rows]
        out.append(f"On the held-out half, the trial {name} picks has a lower loss than the fixed trial picked "
                   f"in {test_wins} of {len(rows)} seeds (mean improvement {statistics.mean(tgap):.4f}, median "
                   f"{statistics.median(tgap):.4f}).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 seeds, one end-to-end run")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 of the in-process comparison")
    parser.add_argument("--e2e-seeds", type=int, default=2, help="end-to-end runs (kubetune run), seeds 0..N-1")
    parser.add_argument("--pb2", action="store_true", help="also PB2 (the GP-bandit explore) in process")
    parser.add_argument("--e2e-async", action="store_true",
                        help="end to end with the asynchronous PBT (the example's settings without synch)")
    args = parser.parse_args()
    seeds = list(range(3 if args.quick else args.seeds))
    e2e = list(range(1 if args.quick else args.e2e_seeds))
    import torch

    torch.set_num_threads(1)
    tr = load_trainer()
    ex = example()
    spec = ex["doc"]["spec"]
    print(f"\nPBT vs fixed hyperparameters: examples/pbt.yaml, population {spec['budget']['maxTrials']}, "
          f"{ex['epochs']} epochs, {ex['hidden']} hidden units, objective {spec['objective']['metric']} "
          f"({spec['objective']['goal']}), PBT settings {json.dumps(spec['earlyStopping']['settings'])}\n")
    print("1. Generation by generation in one process (no model trained more than "
          f"{ex['epochs']} epochs; validation = the first half of the trainer's validation digits, "
          "test loss = the best trial's loss on the second half):\n")
    rows, best = [], []
    for seed in seeds:
        f = run_in_process(tr, ex, seed, pbt=False)
        p = run_in_process(tr, ex, seed, pbt=True)
        rows.append((seed, f, p))
        best.append((seed, p["study"]))
    print("\n".join(table(rows)))
    for seed, study in best[:2]:
        print(f"\nlineage of PBT's best trial, seed {seed} (in process):")
        print("  " + study.lineage().replace("\n", "\n  "))
    if args.pb2:
        print("\nPB2 (same exploit, GP-bandit explore), same seeds, in process:\n")
        rows2 = [(seed, f, run_in_process(tr, ex, seed, pbt=True, method="pb2")) for seed, f, _ in rows]
        print("\n".join(table(rows2, "PB2")))
        better = sum(1 for (_, _, p), (_, _, q) in zip(rows, rows2) if min(q["loss"]) < min(p["loss"]))
        print(f"PB2's best val loss below PBT's in {better} of {len(rows)} seeds "
              f"(mean PBT {statistics.mean(min(p['loss']) for _, _, p in rows):.4f}, "
              f"PB2 {statistics.mean(min(q['loss']) for _, _, q in rows2):.4f}).")

    if not e2e:
        return
    base = copy.deepcopy(ex["doc"])
    synch = bool(base["spec"]["earlyStopping"]["settings"].get("synch")) and not args.e2e_async
    base["spec"]["earlyStopping"]["settings"]["synch"] = synch
    print("\n2. End to end (`kubetune run`, one process per trial; members start seconds apart; "
          f"{'synchronous: each check waits for the population' if synch else 'asynchronous'}):\n")
    rows = []
    base["spec"]["trialTemplate"]["workingDir"] = str(ROOT / "examples")
    with tempfile.TemporaryDirectory() as tmp:
        lineages = []
        for seed in e2e:
            pbt = copy.deepcopy(base)
            pbt["metadata"]["name"] = f"pbt-{seed}"
            pbt["spec"]["algorithm"]["settings"]["seed"] = seed
            fixed = copy.deepcopy(pbt)
            fixed["metadata"]["name"] = f"fixed-{seed}"
            del fixed["spec"]["earlyStopping"]
            p, f = run_cli(pbt, Path(tmp)), run_cli(fixed, Path(tmp))
            f["exploits"] = 0
            records = [json.loads(line) for line in
                       (Path(tmp) / "state" / pbt["metadata"]["name"] / "trials.jsonl").read_text().splitlines()]
            p["exploits"] = sum(1 for r in records for e in r["events"] if e["event"] == "exploit")
            rows.append((seed, f, p))
            lineages.append((seed, p.get("lineage") or []))
    print("\n".join(table(rows)))
    for seed, segments in lineages:
        print(f"\nlineage of PBT's best trial, seed {seed} (end to end):")
        for s in segments:
            donor = f"from trial {s['donor']}'s checkpoint, " if s["donor"] is not None else ""
            span = "no reports" if s["from_step"] is None else f"epochs {s['from_step']:g}-{s['to_step']:g}"
            print(f"  trial {s['trial']}: {donor}{span} with {fmt_params(s['params'])}")


if __name__ == "__main__":
    main()
