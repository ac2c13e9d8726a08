"""`kubetune run` end to end on this machine: real trial processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRIALS = Path(__file__).resolve().parent / "trials"


def kubetune(*args, cwd, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def write_spec(path: Path, name: str, spec: dict) -> Path:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def journal(state: Path, name: str) -> dict[int, dict]:
    latest = {}
    path = state / name / "trials.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record["number"]] = record
    return latest


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_quickstart_runs_and_names_the_best_trial(tmp_path):
    result = kubetune("run", str(ROOT / "examples" / "quickstart.yaml"), "--json", "--state-dir",
                      str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["experiment"] == "quickstart"
    assert summary["status"] == "Succeeded" and summary["reason"] == "MaxTrialsReached"
    assert summary["counts"]["Succeeded"] == 16
    best = summary["best"]
    assert best["trial"].startswith("quickstart-") and 0.9 < best["value"] <= 1.0
    assert set(best["params"]) == {"lr", "hidden", "alpha", "activation"}
    # The table of best trials goes to stderr with --json, headed by the objective.
    assert "best trials by val_accuracy (maximize)" in result.stderr
    shown = kubetune("results", "quickstart", "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["best"] == best


def counted_spec(tmp_path, name: str, max_trials: int):
    """Sobol over counted.py (which notes each trial it finishes), two at a time."""
    return write_spec(tmp_path / "exp.yaml", name, {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": -3, "max": 3}],
        "algorithm": {"name": "sobol", "settings": {"seed": 5}},
        "budget": {"maxTrials": max_trials, "parallelTrials": 2},
        "trialTemplate": {"command": ["python", str(TRIALS / "counted.py")]},
    })


@pytest.mark.parametrize("sig,over_redis", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGHUP, False),
                                             (signal.SIGINT, True)], ids=["ctrl-c", "kill", "hangup", "ctrl-c-redis"])
def test_interrupt_then_resume_finishes_the_budget_without_rerunning_finished_trials(tmp_path, request, sig,
                                                                                      over_redis):
    from tests.test_local_bus import bus_keys

    server = request.getfixturevalue("redis_server") if over_redis else None
    bus = ["--redis", server.url] if over_redis else []
    count_file = tmp_path / "finished.txt"
    spec = counted_spec(tmp_path, "resumable", 10)
    gate = tmp_path / "go"
    env = {"COUNT_FILE": str(count_file), "STEP_SECONDS": "0.4", "HOLD_FROM": "4", "HOLD_FILE": str(gate)}
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(spec), *bus, "--state-dir", str(state)],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def some_done_some_running():
            # Interrupt well away from any trial's last moments: a trial killed while its
            # interpreter shuts down has done its work but is rightly run again.
            records = journal(state, "resumable").values()
            quiet = count_file.exists() and time.time() - count_file.stat().st_mtime > 0.25
            return (sum(r["state"] == "Succeeded" for r in records) >= 3 and quiet
                    and any(r["state"] == "Running" for r in records))
        wait_for(some_done_some_running, 120, "three finished trials and one mid-run")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    first = journal(state, "resumable")
    finished_before = {n for n, r in first.items() if r["state"] == "Succeeded"}
    interrupted = {n for n, r in first.items() if r["state"] == "Killed"}
    assert interrupted, "the interruption should have caught a trial mid-run"
    assert all(first[n]["reason"] == "interrupted" for n in interrupted)
    if over_redis:
        run_id = json.loads((state / "resumable" / "state.json").read_text())["bus_run"]
        assert bus_keys(server) == []  # an interrupted run deletes its keys too

    gate.touch()  # trials 4 and up held the first run open; the second runs them through
    second = kubetune("run", str(spec), *bus, "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["counts"]["Succeeded"] == 10 and summary["trials"] == 10
    runs = [int(n) for n in count_file.read_text().split()]
    assert sorted(runs) == list(range(10)), f"each trial must finish exactly once, got {sorted(runs)}"
    final = journal(state, "resumable")
    assert all(final[n]["attempt"] == 1 for n in finished_before)
    assert all(final[n]["attempt"] == 2 for n in interrupted)
    # The parameters of a finished trial are the ones recorded before the interruption.
    assert all(final[n]["params"] == first[n]["params"] for n in first)
    for r in final.values():  # every report of the run that finished reached the engine
        assert [s for s, _ in r["intermediate"]] == [1, 2, 3]
    if over_redis:  # the resumed run read the same stream, and deleted it at its end
        assert json.loads((state / "resumable" / "state.json").read_text())["bus_run"] == run_id
        assert bus_keys(server) == []

    # Running a finished experiment again runs nothing and shows its results.
    third = kubetune("run", str(spec), "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
    assert third.returncode == 0
    assert len(count_file.read_text().split()) == 10


def test_crash_hang_and_garbage_are_failed_with_reasons_and_the_experiment_goes_on(tmp_path):
    spec = write_spec(tmp_path / "exp.yaml", "misbehaving", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "mode", "type": "categorical", "values": ["crash", "hang", "garbage", "ok"]}],
        "algorithm": {"name": "grid"},
        "budget": {"maxTrials": 4, "parallelTrials": 2, "maxFailedTrials": 3, "trialTimeout": "3s"},
        "trialTemplate": {"command": ["python", str(TRIALS / "misbehaving.py"), "${mode}"]},
    })
    result = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    by_mode = {r["params"]["mode"]: r for r in journal(tmp_path / "state", "misbehaving").values()}
    assert by_mode["crash"]["state"] == "Failed"
    assert by_mode["crash"]["reason"] == "exited with code 3: RuntimeError: CUDA out of memory (simulated)"
    assert by_mode["hang"]["state"] == "Failed"
    assert by_mode["hang"]["reason"] == "exceeded trialTimeout (3s)"
    assert by_mode["garbage"]["state"] == "Failed"
    assert by_mode["garbage"]["reason"] == "no value for objective metric 'loss' was reported"
    assert by_mode["ok"]["state"] == "Succeeded" and by_mode["ok"]["value"] == 0.5
    summary = json.loads(result.stdout)
    assert summary["reason"] == "MaxTrialsReached" and summary["best"]["params"] == {"mode": "ok"}
    # A crashed trial's output is kept in its own folder.
    log = tmp_path / "state" / "misbehaving" / "trials" / by_mode["crash"]["name"] / "output.log"
    assert "CUDA out of memory" in log.read_text()


def test_too_many_failures_fail_the_experiment(tmp_path):
    spec = write_spec(tmp_path / "exp.yaml", "all-crash", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "budget": {"maxTrials": 10, "parallelTrials": 1, "maxFailedTrials": 1},
        "trialTemplate": {"command": ["python", str(TRIALS / "misbehaving.py"), "crash"]},
    })
    result = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path)
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "Failed" and summary["reason"] == "MaxFailedTrialsReached"
    assert summary["counts"]["Failed"] == 2 and summary["trials"] == 2


def test_parameters_reach_the_trial_in_command_and_environment(tmp_path):
    spec = write_spec(tmp_path / "exp.yaml", "echo", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [
            {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
            {"name": "lr", "type": "double", "min": 0.001, "max": 0.1, "log": True},
            {"name": "momentum", "type": "double", "min": 0.5, "max": 0.9, "when": {"opt": "sgd"}},
        ],
        "algorithm": {"name": "grid", "settings": {"points": 2}},
        "budget": {"maxTrials": 10, "parallelTrials": 2},
        "trialTemplate": {"command": ["python", str(TRIALS / "echo_args.py"), "--opt", "${opt}",
                                      "--lr=${trialParameters.lr}", "--momentum", "${momentum}", "${trialName}"],
                          "env": [{"name": "EXTRA", "value": "yes"}]},
    })
    # (As inside a pod: its termination log is not the trials'.)
    result = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path,
                      env={"KUBETUNE_TERMINATION_LOG": "/dev/termination-log"})
    assert result.returncode == 0, result.stderr
    records = journal(tmp_path / "state", "echo")
    assert len(records) == 6  # adam x 2 lr + sgd x 2 lr x 2 momentum
    dirs = set()
    for r in records.values():
        folder = tmp_path / "state" / "echo" / "trials" / r["name"]
        seen = json.loads((folder / "seen.json").read_text())
        p = r["params"]
        expected = ["--opt", p["opt"], f"--lr={p['lr']!r}"]
        if p["opt"] == "sgd":
            expected += ["--momentum", repr(p["momentum"])]
        assert seen["argv"] == expected + [r["name"]]
        assert seen["params"] == p
        assert seen["env"]["KUBETUNE_PARAM_LR"] == repr(p["lr"])
        assert seen["env"]["EXTRA"] == "yes"
        assert seen["env"]["KUBETUNE_TRIAL_NAME"] == r["name"]
        assert seen["env"]["KUBETUNE_TERMINATION_LOG"] == ""
        assert r["value"] == p["lr"]
        dirs.add(seen["env"]["KUBETUNE_TRIAL_DIR"])
    assert len(dirs) == 6


def test_stdout_metrics_example_runs(tmp_path):
    spec_doc = yaml.safe_load((ROOT / "examples" / "stdout-metrics.yaml").read_text())
    spec_doc["spec"]["budget"] = {"maxTrials": 4, "parallelTrials": 2}
    spec_doc["spec"]["trialTemplate"]["command"][1] = str(ROOT / "examples" / "trainers" / "softmax_stdout.py")
    spec = tmp_path / "exp.yaml"
    spec.write_text(yaml.safe_dump(spec_doc))
    result = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = journal(tmp_path / "state", "stdout-metrics")
    assert all(r["state"] == "Succeeded" for r in records.values())
    for r in records.values():
        steps = [s for s, _ in r["intermediate"]]
        assert steps == list(range(1, 16))  # one report per printed epoch line
        assert r["value"] == r["intermediate"][-1][1]  # strategy: latest


def test_changing_the_search_of_an_existing_experiment_is_refused(tmp_path):
    spec = write_spec(tmp_path / "exp.yaml", "fixed", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 0.1}],
        "budget": {"maxTrials": 1},
        "trialTemplate": {"command": ["python", str(TRIALS / "echo_args.py")]},
    })
    assert kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), cwd=tmp_path).returncode == 0
    before = (tmp_path / "state" / "fixed" / "trials.jsonl").read_text()
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["parameters"][0]["max"] = 0.5
    spec.write_text(yaml.safe_dump(doc))
    again = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert again.returncode == 2
    assert "differs from the earlier run" in again.stderr
    assert (tmp_path / "state" / "fixed" / "trials.jsonl").read_text() == before


def test_warm_start_takes_the_earlier_experiments_finished_trials(tmp_path):
    from kubetune.api.spec import load_spec
    from kubetune.runtime.runner import load_prior

    base = {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 0.1, "log": True}],
        "algorithm": {"name": "tpe", "settings": {"seed": 1}},
        "budget": {"maxTrials": 4, "parallelTrials": 2},
        "trialTemplate": {"command": ["python", str(TRIALS / "echo_args.py")]},
    }
    first = write_spec(tmp_path / "first.yaml", "first", base)
    assert kubetune("run", str(first), "--state-dir", str(tmp_path / "state"), cwd=tmp_path).returncode == 0
    # Today's space is narrower: trials outside it are left out.
    narrower = dict(base, parameters=[{"name": "lr", "type": "double", "min": 0.001, "max": 0.05, "log": True}],
                    warmStart={"fromExperiments": ["first"]})
    second = write_spec(tmp_path / "second.yaml", "second", narrower)
    earlier = journal(tmp_path / "state", "first")
    fitting = sorted(r["value"] for r in earlier.values() if r["params"]["lr"] <= 0.05)
    assert fitting, "seed 1 gives the first experiment trials inside the narrower range"
    prior = load_prior(load_spec(second), tmp_path / "state")
    assert sorted(t.value for t in prior) == fitting
    assert kubetune("run", str(second), "--state-dir", str(tmp_path / "state"), cwd=tmp_path).returncode == 0

    missing = write_spec(tmp_path / "third.yaml", "third", dict(base, warmStart={"fromExperiments": ["nope"]}))
    result = kubetune("run", str(missing), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 2
    assert "spec.warmStart.fromExperiments[0]: no earlier experiment 'nope'" in result.stderr


def test_warm_start_from_an_experiment_with_another_objective_is_refused_or_uses_its_recorded_metric(tmp_path):
    """Loss values fed to a sampler as accuracies turn its prior upside down: an earlier experiment must
    have optimised the same metric the same way, or have recorded this one's metric, whose values are used."""
    from kubetune.api.spec import load_spec
    from kubetune.runtime.runner import load_prior

    state = tmp_path / "state"

    def spec(metric, goal, prints, warm=None):
        # Prints loss=lr, and acc=1-lr when asked to.
        code = "import sys; lr = float(sys.argv[1]); print(f'loss={lr}' + (f' acc={1 - lr}' if sys.argv[2] == 'yes' else ''))"
        doc = {
            "objective": {"metric": metric, "goal": goal},
            "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 0.1}],
            "algorithm": {"name": "tpe", "settings": {"seed": 1}},
            "budget": {"maxTrials": 3, "parallelTrials": 3},
            "trialTemplate": {"command": ["python", "-c", code, "${lr}", prints]},
        }
        if warm:
            doc["warmStart"] = {"fromExperiments": warm}
        return doc

    for name, prints in (("loss-only", "no"), ("loss-and-acc", "yes")):
        path = write_spec(tmp_path / f"{name}.yaml", name, spec("loss", "minimize", prints))
        assert kubetune("run", str(path), "--state-dir", str(state), cwd=tmp_path).returncode == 0

    other_metric = write_spec(tmp_path / "acc.yaml", "acc", spec("acc", "maximize", "yes", ["loss-and-acc", "loss-only"]))
    result = kubetune("run", str(other_metric), "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 2
    assert ("spec.warmStart.fromExperiments[1]: experiment 'loss-only' minimizes loss; this one maximizes acc, "
            "and none of its succeeded trials reported 'acc'") in result.stderr
    assert "fromExperiments[0]" not in result.stderr
    assert not (state / "acc" / "state.json").exists()  # nothing run: a corrected spec starts afresh

    other_goal = write_spec(tmp_path / "max.yaml", "max", spec("loss", "maximize", "no", ["loss-only"]))
    result = kubetune("run", str(other_goal), "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 2
    assert ("spec.warmStart.fromExperiments[0]: experiment 'loss-only' minimizes loss; this one maximizes loss"
            in result.stderr)

    # An earlier experiment that recorded acc beside its objective gives its acc values.
    recorded = write_spec(tmp_path / "acc2.yaml", "acc2", spec("acc", "maximize", "yes", ["loss-and-acc"]))
    earlier = journal(state, "loss-and-acc").values()
    prior = load_prior(load_spec(recorded), state)
    assert sorted(t.value for t in prior) == sorted(r["metrics"]["acc"] for r in earlier)
    assert sorted(t.value for t in prior) == pytest.approx(sorted(1 - r["value"] for r in earlier))
    assert kubetune("run", str(recorded), "--state-dir", str(state), cwd=tmp_path).returncode == 0


def synch_pbt_spec() -> dict:
    """Synchronous PBT over pbt_toy.py: members start 0.4 s apart (steps take 10 ms), trial 2 crashes at step 5."""
    return {
        "objective": {"metric": "score", "goal": "maximize", "strategy": "latest"},
        "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 0.3, "log": True}],
        "algorithm": {"name": "random", "settings": {"seed": 1}},
        "earlyStopping": {"name": "pbt", "settings": {"perturbationInterval": 3, "quantileFraction": 0.25,
                                                      "synch": True}},
        "budget": {"maxTrials": 5, "parallelTrials": 5, "maxFailedTrials": 1},
        "trialTemplate": {"command": ["python", str(TRIALS / "pbt_toy.py")],
                          "env": [{"name": "STEPS", "value": "12"}, {"name": "STEP_SECONDS", "value": "0.01"},
                                  {"name": "START_DELAY", "value": "0.4"}, {"name": "CRASH_TRIAL", "value": "2"},
                                  {"name": "CRASH_STEP", "value": "5"}]},
    }


def check_synch_pbt(records: dict) -> None:
    """Every donor was taken at the taker's step, the checks went on without the member that died."""
    assert [r["state"] for r in records.values()].count("Failed") == 1 and records[2]["state"] == "Failed"
    exploits = [e for r in records.values() for e in r["events"] if e["event"] == "exploit"]
    assert exploits and all(e["donor_step"] == e["step"] for e in exploits)
    assert all(e["step"] in (3, 6, 9, 12) for e in exploits)
    # The checkpoint each taker loaded is the donor's from that step, not a newer one the donor saved
    # while the taker copied: its next step trains on from exactly the donor's w then.
    for r in records.values():
        for e in (e for e in r["events"] if e["event"] == "exploit"):  # each followed by a report
            w = dict(map(tuple, records[e["donor"]]["intermediate"]))[e["donor_step"]]
            assert r["intermediate"][e["report"]][1] == pytest.approx(w + e["new"]["lr"] * (1 - w), abs=1e-12)
    for r in records.values():
        steps = [s for s, _ in r["intermediate"]]
        assert steps == list(range(1, len(steps) + 1))  # own counter, and no step lost to a wait


def test_synchronous_pbt_waits_for_the_population_and_not_for_a_member_that_died(tmp_path):
    """Each check waits until every live member has reported that step; the checks at step 6 go on
    without trial 2, which crashed at step 5."""
    path = write_spec(tmp_path / "synch.yaml", "synch", synch_pbt_spec())
    started = time.monotonic()
    result = kubetune("run", str(path), "--json", "--state-dir", str(tmp_path / "state"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60  # ANSWER_TIMEOUT never ran out: nobody waited for the dead one
    check_synch_pbt(journal(tmp_path / "state", "synch"))


def test_raising_the_timeout_continues_an_experiment_that_timed_out(tmp_path):
    """budget.timeout bounds the experiment's whole running time, as maxTrials its trials: raised past the time
    it ran, an experiment that ended with Timeout goes on for what is left. Raising maxTrials alone does not
    bring it back. The trial the ending stopped stays Killed."""
    gate = tmp_path / "go"
    env = {"COUNT_FILE": str(tmp_path / "finished.txt"), "STEP_SECONDS": "0.05", "HOLD_FROM": "1",
           "HOLD_FILE": str(gate)}
    state = tmp_path / "state"

    def run(max_trials: int, timeout: str) -> dict:
        spec = write_spec(tmp_path / "exp.yaml", "clock", {
            "objective": {"metric": "loss", "goal": "minimize"},
            "parameters": [{"name": "x", "type": "double", "min": -3, "max": 3}],
            "algorithm": {"name": "sobol", "settings": {"seed": 5}},
            "budget": {"maxTrials": max_trials, "parallelTrials": 1, "timeout": timeout},
            "trialTemplate": {"command": ["python", str(TRIALS / "counted.py")]},
        })
        result = kubetune("run", str(spec), "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = run(3, "6s")  # trial 0 finishes, trial 1 waits for the gate until the timeout
    assert first["reason"] == "Timeout" and first["trials"] == 2, first
    assert first["elapsed_seconds"] >= 6
    before = journal(state, "clock")
    assert run(4, "6s")["reason"] == "Timeout"  # out of time all the same
    assert journal(state, "clock") == before
    gate.touch()
    last = run(3, "1h")
    assert last["reason"] == "MaxTrialsReached" and last["trials"] == 3, last
    assert last["counts"]["Succeeded"] == 2 and last["counts"]["Killed"] == 1
    assert last["elapsed_seconds"] >= first["elapsed_seconds"]  # measured from the experiment's start
    final = journal(state, "clock")
    assert final[0] == before[0] and final[1] == before[1]  # (trial 1: "experiment ended: Timeout")


def test_raising_max_failed_trials_continues_a_failed_experiment_but_no_budget_revives_a_goal_or_exhausted_one(
        tmp_path):
    """The same rule for every budget field: an ended experiment goes on when what ended it no longer holds.
    GoalReached and SearchSpaceExhausted hold whatever the budget."""
    state = tmp_path / "state"

    def run(name: str, mode: str, **over) -> dict:
        spec = {"objective": {"metric": "loss", "goal": "minimize"},
                "parameters": [{"name": "p", "type": "categorical", "values": ["a", "b"]}],
                "algorithm": {"name": "grid"},
                "trialTemplate": {"command": ["python", str(TRIALS / "misbehaving.py"), mode]}}
        spec.update(over)
        result = kubetune("run", str(write_spec(tmp_path / f"{name}.yaml", name, spec)), "--state-dir", str(state),
                          "--json", cwd=tmp_path)
        return json.loads(result.stdout)

    failed = run("flaky", "crash", algorithm={"name": "random"}, budget={"maxTrials": 4, "maxFailedTrials": 1})
    assert failed["reason"] == "MaxFailedTrialsReached" and failed["trials"] == 2
    still = run("flaky", "ok", algorithm={"name": "random"}, budget={"maxTrials": 4, "maxFailedTrials": 1})
    assert still["reason"] == "MaxFailedTrialsReached" and still["trials"] == 2
    raised = run("flaky", "ok", algorithm={"name": "random"}, budget={"maxTrials": 4, "maxFailedTrials": 2})
    assert raised["reason"] == "MaxTrialsReached" and raised["counts"]["Succeeded"] == 2, raised

    goal = {"metric": "loss", "goal": "minimize", "target": 1.0}
    assert run("goal", "ok", objective=goal, budget={"maxTrials": 2})["reason"] == "GoalReached"
    again = run("goal", "ok", objective=goal, budget={"maxTrials": 5})
    assert again["reason"] == "GoalReached" and again["trials"] == 1

    assert run("grid", "ok", budget={"maxTrials": 5})["reason"] == "SearchSpaceExhausted"
    again = run("grid", "ok", budget={"maxTrials": 9})
    assert again["reason"] == "SearchSpaceExhausted" and again["trials"] == 2


def test_a_resumed_run_killed_with_sigkill_is_resumed_again(tmp_path):
    """A finished run whose budget was raised, then killed with -9 mid-run: the next run goes on with it,
    not shows the first run's ending over trials left Running."""
    count_file = tmp_path / "finished.txt"
    gate = tmp_path / "go"
    env = {"COUNT_FILE": str(count_file), "STEP_SECONDS": "0.05", "HOLD_FROM": "2", "HOLD_FILE": str(gate)}
    state = tmp_path / "state"
    first = kubetune("run", str(counted_spec(tmp_path, "raised", 2)), "--state-dir", str(state), cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    spec = counted_spec(tmp_path, "raised", 4)
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(spec), "--state-dir", str(state)],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(r["state"] == "Running" for r in journal(state, "raised").values()) == 2, 60,
                 "trials 2 and 3 running")
    finally:
        proc.kill()  # kill -9: no chance to record anything
        proc.wait()
    gate.touch()  # (the killed run's trials are stopped with it: see test_local_orphans.py)
    second = kubetune("run", str(spec), "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["reason"] == "MaxTrialsReached" and summary["counts"]["Succeeded"] == 4, summary
    assert all(r["state"] == "Succeeded" for r in journal(state, "raised").values())


def test_a_timed_out_trial_that_ignores_sigterm_and_keeps_reporting_is_killed(tmp_path):
    """Each report of a trial being stopped is answered `stop`; that must not put off its SIGKILL."""
    spec = write_spec(tmp_path / "exp.yaml", "stubborn", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "budget": {"maxTrials": 1, "parallelTrials": 1, "trialTimeout": "3s"},
        "trialTemplate": {"command": ["python", str(TRIALS / "stubborn.py")]},
    })
    env = {"MARKER_DIR": str(tmp_path), "RUN_SECONDS": "30"}
    result = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path, env=env)
    assert (tmp_path / "term").exists(), result.stderr
    assert not (tmp_path / "survived").exists(), "the trial ran to its own end: SIGKILL never came"
    [record] = journal(tmp_path / "state", "stubborn").values()
    assert record["state"] == "Failed" and record["reason"] == "exceeded trialTimeout (3s)"
    assert result.returncode == 1 and json.loads(result.stdout)["reason"] == "NoTrialSucceeded"


def test_the_first_record_after_one_cut_short_by_a_crash_is_kept(tmp_path):
    """kill -9 in the middle of a journal write leaves a record without its newline; the next run's first
    record must not be glued onto it (and lost with it)."""
    from kubetune.api.trial import Trial, TrialState
    from kubetune.runtime.store import StateStore

    store = StateStore(tmp_path, "torn")
    store.save_trials([Trial(0, {"x": 1}, TrialState.SUCCEEDED, 0.5), Trial(1, {"x": 2}, TrialState.RUNNING)])
    store.close()
    cut = json.dumps(Trial(1, {"x": 2}, TrialState.SUCCEEDED, 0.25).to_dict())
    with store.journal.open("a") as f:
        f.write(cut[:len(cut) // 2])  # the crash
    resumed = StateStore(tmp_path, "torn")
    assert [t.state for t in resumed.load_trials()] == [TrialState.SUCCEEDED, TrialState.RUNNING]
    resumed.save_trials([Trial(1, {"x": 2}, TrialState.SUCCEEDED, 0.125)])
    resumed.close()
    trials = StateStore(tmp_path, "torn").load_trials()
    assert (trials[1].state, trials[1].value) == (TrialState.SUCCEEDED, 0.125)


def test_a_spec_file_that_is_not_utf8_is_a_usage_error_naming_the_file(tmp_path):
    """A YAML saved as UTF-16 (PowerShell's `>` writes it) is exit 2 with the file named, not a traceback."""
    spec = write_spec(tmp_path / "exp.yaml", "utf16", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "trialTemplate": {"command": ["python", "-c", "print('loss=1')"]},
    })
    spec.write_bytes(spec.read_text().encode("utf-16"))
    for command in ("run", "validate"):
        result = kubetune(command, str(spec), "--state-dir", str(tmp_path / "state"), cwd=tmp_path) \
            if command == "run" else kubetune(command, str(spec), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and str(spec) in result.stderr and "UTF-8" in result.stderr
    assert not (tmp_path / "state").exists()


def test_a_second_run_of_an_experiment_already_running_is_refused(tmp_path):
    """Two `kubetune run`s of one experiment would both run its unfinished trials and write one journal."""
    count_file = tmp_path / "finished.txt"
    gate = tmp_path / "go"
    env = {"COUNT_FILE": str(count_file), "STEP_SECONDS": "0.05", "HOLD_FROM": "0", "HOLD_FILE": str(gate)}
    state = tmp_path / "state"
    spec = counted_spec(tmp_path, "twice", 2)
    first = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(spec), "--state-dir", str(state)],
                             cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sum(r["state"] == "Running" for r in journal(state, "twice").values()) == 2, 60,
                 "the first run's trials running")
        second = kubetune("run", str(spec), "--state-dir", str(state), cwd=tmp_path, env=env, timeout=30)
        assert second.returncode == 2, second.stderr
        assert "another" in second.stderr and str(state / "twice") in second.stderr
        assert all(r["attempt"] == 1 for r in journal(state, "twice").values())
    finally:
        gate.touch()
        try:
            first.wait(timeout=60)
        finally:
            first.kill()
    assert first.returncode == 0, first.stderr.read()
    assert sorted(int(n) for n in count_file.read_text().split()) == [0, 1]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_trial_that_leaves_a_background_process_behind_ends_with_its_process(tmp_path):
    """A trial's leftover child holds its output open; the trial must still end when its process does,
    and the leftover must not outlive the run."""
    marker = tmp_path / "child.pid"
    spec = write_spec(tmp_path / "exp.yaml", "leftover", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "budget": {"maxTrials": 1, "parallelTrials": 1},
        "trialTemplate": {"command": ["sh", "-c", f"sleep 300 & echo $! > {marker}; sleep 301 >/dev/null & "
                                                  f"echo $! >> {marker}; echo loss=0.5"]},
        "metricsCollector": {"kind": "stdout"},
    })
    try:
        result = kubetune("run", str(spec), "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path,
                          timeout=40)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["best"]["value"] == 0.5
        pids = [int(p) for p in marker.read_text().split()]
        assert len(pids) == 2
        wait_for(lambda: not any(alive(p) for p in pids), 10, "the trial's leftover processes to be gone")
    finally:
        for pid in (int(p) for p in marker.read_text().split()) if marker.exists() else ():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_under_nohup_a_hangup_does_not_stop_the_run(tmp_path):
    spec = counted_spec(tmp_path, "nohup", 2)
    gate = tmp_path / "go"
    env = {"COUNT_FILE": str(tmp_path / "finished.txt"), "STEP_SECONDS": "0.05", "HOLD_FROM": "0",
           "HOLD_FILE": str(gate)}
    state = tmp_path / "state"
    proc = subprocess.Popen(["nohup", sys.executable, "-m", "kubetune.cli", "run", str(spec), "--state-dir", str(state)],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(r["state"] == "Running" for r in journal(state, "nohup").values()) == 2, 60,
                 "both trials running")
        proc.send_signal(signal.SIGHUP)
        gate.touch()
        assert proc.wait(timeout=60) == 0
    finally:
        gate.touch()
        proc.kill()
    assert all(r["state"] == "Succeeded" for r in journal(state, "nohup").values())


def test_the_time_a_run_killed_with_sigkill_spent_counts_toward_the_timeout(tmp_path):
    """The experiment's elapsed time (what budget.timeout is measured on) is saved as the run goes, not
    only at its end: a run killed with -9 and run again must not start its clock afresh."""
    gate = tmp_path / "go"
    env = {"COUNT_FILE": str(tmp_path / "finished.txt"), "STEP_SECONDS": "0.05", "HOLD_FROM": "0",
           "HOLD_FILE": str(gate)}
    state = tmp_path / "state"
    spec = counted_spec(tmp_path, "clock", 2)

    def elapsed() -> float:
        try:
            return json.loads((state / "clock" / "state.json").read_text())["elapsed"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0.0

    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(spec), "--state-dir", str(state)],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: elapsed() > 0, 30, "the elapsed time saved while the run goes")
    finally:
        proc.kill()
        proc.wait()
        gate.touch()  # (the killed run's trial is stopped with it: see test_local_orphans.py)
    before = elapsed()
    again = kubetune("run", str(spec), "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["elapsed_seconds"] >= before


def test_a_trial_that_exits_cleanly_on_sigterm_when_interrupted_is_run_again(tmp_path):
    """Exit code 0 after the runner's SIGTERM is a trial cut short (trainers that save on preemption exit
    cleanly), not one that finished: it must not be recorded Succeeded with its partial curve."""
    gate = tmp_path / "go"
    env = {"MARKER_DIR": str(tmp_path), "HOLD_FILE": str(gate)}
    spec = write_spec(tmp_path / "exp.yaml", "graceful", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 1, "max": 2}],
        "algorithm": {"name": "sobol", "settings": {"seed": 5}},
        "budget": {"maxTrials": 2, "parallelTrials": 2},
        "trialTemplate": {"command": ["python", str(TRIALS / "graceful.py")]},
    })
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(spec), "--state-dir", str(state)],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: all((tmp_path / f"{n}.reported").exists() for n in (0, 1)), 60, "both trials reporting")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    first = journal(state, "graceful")
    assert [(r["state"], r["reason"]) for r in first.values()] == [("Killed", "interrupted")] * 2
    gate.touch()
    again = kubetune("run", str(spec), "--state-dir", str(state), "--json", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    final = journal(state, "graceful")
    assert all(r["state"] == "Succeeded" and r["attempt"] == 2 and len(r["intermediate"]) == 3
               for r in final.values()), final
