"""PBT against the same population trained with fixed hyperparameters, on this machine.

    python -m bench.pbt [--quick]

For each seed, `examples/pbt.yaml` runs twice with `kubetune run`: as shipped
(PBT exploits and explores every 4 epochs) and without its earlyStopping (the
same initial configurations, each trained with its own fixed hyperparameters).
Prints the best and mean final accuracy of both, and the best PBT trial's lineage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(doc: dict, work: Path) -> dict:
    path = work / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(path), "--json", "--quiet",
                          "--state-dir", str(work / "state")], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    summary = json.loads(out.stdout)
    finals = []
    for line in (work / "state" / doc["metadata"]["name"] / "trials.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["state"] == "Succeeded":
            finals.append(r["value"])
    summary["finals"] = finals
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed, 12 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    seeds = [4] if args.quick else list(range(4, 4 + args.seeds))
    epochs = "12" if args.quick else "24"
    base = yaml.safe_load((ROOT / "examples" / "pbt.yaml").read_text())
    base["spec"]["trialTemplate"]["workingDir"] = str(ROOT / "examples")
    base["spec"]["trialTemplate"]["env"] = [{"name": "EPOCHS", "value": epochs}]
    rows, lineages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            pbt = json.loads(json.dumps(base))
            pbt["metadata"]["name"] = f"pbt-{seed}"
            pbt["spec"]["algorithm"]["settings"]["seed"] = seed
            fixed = json.loads(json.dumps(pbt))
            fixed["metadata"]["name"] = f"fixed-{seed}"
            del fixed["spec"]["earlyStopping"]
            p, f = run(pbt, Path(tmp)), run(fixed, Path(tmp))
            rows.append((seed, max(f["finals"]), statistics.mean(f["finals"]),
                         max(p["finals"]), statistics.mean(p["finals"])))
            lineages.append((seed, p.get("lineage") or []))
    print(f"\nPBT vs fixed hyperparameters, population {base['spec']['budget']['maxTrials']}, {epochs} epochs, "
          f"PyTorch MLP on digits (val accuracy, higher is better)\n")
    print("| seed | fixed: best | fixed: mean | PBT: best | PBT: mean |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for seed, fb, fm, pb, pm in rows:
        print(f"| {seed} | {fb:.4f} | {fm:.4f} | {pb:.4f} | {pm:.4f} |")
    wins = sum(1 for _, fb, _, pb, _ in rows if pb > fb)
    print(f"\nPBT's best above the best fixed trial in {wins} of {len(rows)} seeds.")
    for seed, segments in lineages:
        print(f"\nlineage of PBT's best trial, seed {seed}:")
        for s in segments:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["params"].items())
            donor = f"from trial {s['donor']}'s checkpoint, " if s["donor"] is not None else ""
            span = "no reports" if s["from_step"] is None else f"epochs {s['from_step']:g}-{s['to_step']:g}"
            print(f"  trial {s['trial']}: {donor}{span} with {params}")


if __name__ == "__main__":
    main()
