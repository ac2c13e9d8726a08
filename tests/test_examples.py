"""The examples run as shipped (budgets trimmed where noted), on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(spec_path: Path, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(spec_path), "--json", "--state-dir",
                           str(tmp_path / "state")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=os.environ)


def trimmed(name: str, tmp_path: Path, **budget) -> Path:
    """The example with a smaller budget, kept next to the original so its relative paths hold."""
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["spec"]["budget"].update(budget)
    wd = EXAMPLES / (doc["spec"]["trialTemplate"].get("workingDir") or ".")
    doc["spec"]["trialTemplate"]["workingDir"] = str(wd.resolve())
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_conditional_example(tmp_path):
    result = run(trimmed("conditional.yaml", tmp_path, maxTrials=6), tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["Succeeded"] == 6
    best = summary["best"]["params"]
    assert ("momentum" in best) == (best["optimizer"] == "sgd")


def test_pbt_example_exploits_in_place_and_prints_the_lineage(tmp_path):
    result = run(EXAMPLES / "pbt.yaml", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["Succeeded"] == 8
    assert "lineage of the best trial" in result.stderr
    records = {}
    for line in (tmp_path / "state" / "pbt" / "trials.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["number"]] = r
    exploits = [(n, e) for n, r in records.items() for e in r["events"] if e["event"] == "exploit"]
    assert exploits, "every 4 epochs the worst quarter takes the best quarter's checkpoint"
    for n, e in exploits:
        # Explore changes every value of the donor's (new may still equal the trial's own old
        # parameters: a trial that exploits the same donor again can draw the same perturbation).
        assert e["donor"] != n and set(e["new"]) == {"lr", "momentum", "weight_decay"}
        assert all(e["new"][k] != e["donor_params"][k] for k in e["new"])
        # In place: one process ran the trial (one "starting" line), and it logged taking the donor's weights.
        log = (tmp_path / "state" / "pbt" / "trials" / records[n]["name"] / "output.log").read_text()
        assert log.count("starting at epoch") == 1
        assert f"took trial {e['donor']}'s checkpoint" in log
    for r in records.values():
        for e in r["events"]:
            if e["event"] == "exploit":
                assert e["report"] < len(r["intermediate"])  # it trained on with the new parameters
            elif e["event"] == "exploit-unused":  # decided on its last epoch: it kept its own
                assert e["report"] == len(r["intermediate"]) and r["params"] == e["old"]
    assert summary["lineage"][-1]["trial"] == summary["best"]["number"]


def test_asha_example_stops_most_trials_early(tmp_path):
    result = run(trimmed("asha.yaml", tmp_path, maxTrials=9), tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["Pruned"] >= 4 and summary["counts"]["Succeeded"] >= 1
