"""A `kubetune run` killed with -9 takes its trials with it: real runners, real process trees.

Each trial here is a tree: trial 0 a Python process (the runner's own child), trial 1 a shell (the
child) with a grandchild it waits for and a double-forked process (its parent gone, still in the group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.test_local_run import alive, kubetune, wait_for, write_spec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")

TREE = r"""
echo $$ >> "$PIDS/$KUBETUNE_TRIAL"
if [ -e "$GATE" ]; then echo loss=0.5; exit 0; fi
if [ -n "$STUBBORN" ]; then trap '' TERM; fi
if [ "$KUBETUNE_TRIAL" = 0 ]; then exec python3 -c 'import time; time.sleep(300)'; fi
sleep 300 &
echo $! >> "$PIDS/$KUBETUNE_TRIAL"
(sleep 301 & echo $! >> "$PIDS/$KUBETUNE_TRIAL")
wait
"""


def tree_spec(tmp_path: Path, name: str) -> Path:
    return write_spec(tmp_path / "exp.yaml", name, {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "algorithm": {"name": "sobol", "settings": {"seed": 5}},
        "budget": {"maxTrials": 2, "parallelTrials": 2},
        "trialTemplate": {"command": ["sh", "-c", TREE]},
        "metricsCollector": {"kind": "stdout"},
    })


class Run:
    """A `kubetune run` of the tree experiment in the background, and the pids of its trials' processes."""

    def __init__(self, tmp_path: Path, name: str, stubborn: bool = False):
        self.tmp_path, self.name = tmp_path, name
        self.pids_dir = tmp_path / "pids"
        self.pids_dir.mkdir()
        self.gate = tmp_path / "go"
        self.state = tmp_path / "state"
        self.spec = tree_spec(tmp_path, name)
        self.env = {"PIDS": str(self.pids_dir), "GATE": str(self.gate), **({"STUBBORN": "1"} if stubborn else {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "run", str(self.spec), "--state-dir", str(self.state)],
            cwd=tmp_path, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(self.pids(0)) == 1 and len(self.pids(1)) == 3, 60, "both trials' processes started")
        self.children = self.pids(0)[:1] + self.pids(1)[:1]  # the runner's own children
        self.descendants = self.pids(1)[1:]  # the shell's grandchild and the double-forked process
        assert all(alive(p) for p in self.children + self.descendants)

    def pids(self, trial: int) -> list[int]:
        try:
            return [int(p) for p in (self.pids_dir / str(trial)).read_text().split()]
        except FileNotFoundError:
            return []

    @property
    def record_file(self) -> Path:
        return self.state / self.name / "processes.json"

    def kill_guard(self) -> None:
        """kill -9 of the guard process (as if it had died first): only the parent-death signal is left."""
        if self.record_file.exists():
            guard = json.loads(self.record_file.read_text())["guard"]
            os.kill(guard, signal.SIGKILL)
            wait_for(lambda: not alive(guard), 10, "the guard gone")

    def kill_runner(self) -> None:
        self.proc.kill()  # kill -9: no chance to stop anything
        self.proc.wait()

    def again(self):
        self.gate.touch()  # the trials of the next run finish at once
        return kubetune("run", str(self.spec), "--state-dir", str(self.state), "--json", cwd=self.tmp_path,
                        env=self.env, timeout=120)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for trial in (0, 1):
            for pid in self.pids(trial):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def tree_run(tmp_path):
    runs = []

    def start(name: str, stubborn: bool = False) -> Run:
        runs.append(Run(tmp_path, name, stubborn))
        return runs[-1]
    yield start
    for run in runs:
        run.close()


def test_kill_9_of_the_runner_takes_every_trial_process_and_their_children_with_it(tree_run):
    run = tree_run("killed")
    run.kill_runner()
    everything = run.children + run.descendants
    wait_for(lambda: not any(alive(p) for p in everything), 30,
             f"every trial process gone (alive: {[p for p in everything if alive(p)]})")


def test_with_the_guard_killed_too_the_parent_death_signal_ends_the_trials(tree_run):
    run = tree_run("no-guard")
    run.kill_guard()
    run.kill_runner()
    wait_for(lambda: not any(alive(p) for p in run.children), 10,
             f"the runner's children gone (alive: {[p for p in run.children if alive(p)]})")


def test_the_next_run_terminates_what_a_killed_run_left_running(tree_run):
    """Processes that ignore SIGTERM, the runner and its guard killed with -9: nothing reached them, and the
    next run of the experiment kills them (SIGKILL after the grace) before it starts its own trials."""
    run = tree_run("leftovers", stubborn=True)
    run.kill_guard()
    run.kill_runner()
    everything = run.children + run.descendants
    assert all(alive(p) for p in everything)  # SIGTERM ignored: the parent-death signal did nothing
    result = run.again()
    assert result.returncode == 0, result.stderr
    assert not [p for p in everything if alive(p)], result.stderr
    assert "terminating 4 of their processes" in result.stderr and "they are gone" in result.stderr
    assert json.loads(result.stdout)["counts"]["Succeeded"] == 2
    assert not run.record_file.exists()  # (forgotten as the run ended with no trial running)


def test_a_recorded_process_that_is_not_the_runs_any_more_is_left_alone(tree_run, tmp_path):
    """The record names a pid that is now another process (its start time differs): the next run kills the
    leftovers that are the run's own, and not that one."""
    run = tree_run("recycled")
    run.kill_guard()
    run.kill_runner()
    wait_for(lambda: not any(alive(p) for p in run.children), 10, "the runner's children gone")
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)  # leads its own group, as a trial did
    try:
        record = json.loads(run.record_file.read_text()) if run.record_file.exists() else {"groups": {}}
        start = int(Path(f"/proc/{stranger.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        record["groups"][str(stranger.pid)] = {"trial": 9, "start": start - 1}  # an earlier process of that pid
        run.record_file.write_text(json.dumps(record))
        result = run.again()
        assert result.returncode == 0, result.stderr
        assert alive(stranger.pid), result.stderr
        assert not [p for p in run.descendants if alive(p)], result.stderr
        assert "terminating 2 of their processes" in result.stderr, result.stderr
        assert str(stranger.pid) not in result.stderr
    finally:
        stranger.kill()
        stranger.wait()


def test_a_trial_started_from_a_thread_that_has_ended_lives_on(tmp_path):
    """The parent-death signal comes when the thread that forked the trial exits, not the process: a
    runtime driven from a short-lived thread must not lose its trials with the thread."""
    from kubetune.api.spec import ExperimentSpec
    from kubetune.api.trial import Trial
    from kubetune.runtime.events import Exited
    from kubetune.runtime.local import LocalRuntime

    gate = tmp_path / "go"
    spec = ExperimentSpec.from_document({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "threaded"},
        "spec": {"objective": {"metric": "loss", "goal": "minimize"},
                 "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
                 "trialTemplate": {"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"]},
                 "metricsCollector": {"kind": "stdout"}}})
    runtime = LocalRuntime(spec, lambda t: tmp_path, tmp_path, processes=tmp_path / "processes.json")
    try:
        starter = threading.Thread(target=runtime.start, args=(Trial(0, {"x": 0.5}, name="t0"),))
        starter.start()
        starter.join()
        wait_for(lambda: not Path(f"/proc/self/task/{starter.native_id}").exists(), 10, "the thread gone")
        gate.touch()  # only now may it end: killed with the thread, it would have ended before
        exits = []
        wait_for(lambda: exits.extend(e for e in runtime.events(0.1) if isinstance(e, Exited)) or exits, 30,
                 "the trial's exit")
        assert exits[0].exit_code == 0, exits[0]
    finally:
        runtime.close()


def test_a_trial_whose_runner_died_before_the_signal_was_set_does_not_start():
    """The runner may die between fork and prctl: the signal would then never come. The child sees
    that its parent is not the one that forked it any more and ends before it execs the trial."""
    from kubetune.runtime import orphans

    forked_by = os.getpid() + 1_000_000  # (not this process: as if it had died and the child were adopted)
    child = subprocess.Popen(["sleep", "30"], preexec_fn=orphans._parent_death(signal.SIGTERM, forked_by))
    try:
        assert child.wait(timeout=10) == 1
    finally:
        child.kill()
