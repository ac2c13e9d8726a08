"""The trial SDK outside and inside an experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
from kubetune import trial
p = trial.params({"lr": 0.1, "epochs": 2})
print("params", sorted(p.items()))
d = trial.report(step=1, loss=0.5, acc=0.75)
print("decision", d.action, d.stop)
"""


def run_script(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env={**clean, **env})


def test_outside_an_experiment_defaults_apply_and_reports_are_printed():
    out = run_script({}).stdout.splitlines()
    assert out == ["params [('epochs', 2), ('lr', 0.1)]", "step=1 loss=0.5 acc=0.75", "decision continue False"]


def test_assigned_parameters_override_the_defaults():
    out = run_script({"KUBETUNE_PARAMS": json.dumps({"lr": 0.003})}).stdout.splitlines()
    assert out[0] == "params [('epochs', 2), ('lr', 0.003)]"


def test_a_metric_that_is_not_a_number_is_refused_with_its_name():
    from kubetune import trial

    with pytest.raises(TypeError, match="metric 'acc' must be a number"):
        trial.report(step=1, acc="high")


def _channel_recording_waits(waits: list):
    """A trial's bus channel (in-memory bus) that appends, per report sent, whether it waits for its decision."""
    from kubetune.bus import MemoryBus, TrialClient
    from kubetune.trial import _BusChannel

    class Client(TrialClient):
        def send_report(self, step, metrics):
            waits.append(self.wait)
            return super().send_report(step, metrics)

    return _BusChannel(Client(MemoryBus(), "ns/exp", 0, wait_s=0.0))


def test_bus_reports_after_a_long_stretch_wait_for_their_own_decision():
    """Once-an-epoch reports must get the decision on that report (an ASHA stop at the rung, not
    an epoch later); reports every step stay batched."""
    waits = []
    channel = _channel_recording_waits(waits)
    now = [100.0]
    channel._clock = lambda: now[0]
    channel._last = now[0]
    for gap in (5.0, 0.01, 0.01, 0.3, 0.05):
        now[0] += gap
        channel.send(1, {"val_accuracy": 0.5})
    assert waits == [True, False, False, True, False]


def test_a_trials_first_bus_report_waits_for_its_own_decision():
    """The channel is made at the first report(), which usually comes after a whole epoch of training:
    an ASHA rung at the first epoch must stop the trial then, not after its second epoch."""
    waits = []
    channel = _channel_recording_waits(waits)
    channel.send(1, {"val_accuracy": 0.5})
    channel.send(1, {"val_accuracy": 0.5})  # right after: batched, as every frequent report
    assert waits == [True, False]


def test_bus_reports_all_wait_for_their_decision_under_synchronous_pbt(monkeypatch):
    """The operator sets KUBETUNE_REPORT_WAIT=1 for synch PBT: a held check must block its trial
    however soon it follows the previous report."""
    monkeypatch.setenv("KUBETUNE_REPORT_WAIT", "1")
    waits = []
    channel = _channel_recording_waits(waits)
    for step in range(1, 4):
        channel.send(step, {"val_accuracy": 0.5})
    assert waits == [True, True, True]


def test_a_decision_with_fields_this_version_does_not_know_is_still_understood():
    """Trial images outlive scheduler versions: an exploit sent with a field added later (say, the
    donor's step) must still reach an older SDK as an exploit (the bus client and the local channel
    both decode with Decision.from_dict)."""
    from kubetune.api.trial import Decision
    from kubetune.bus.base import decode_decision

    seq, d = decode_decision(json.dumps({"seq": 7, "action": "exploit", "donor": 2, "params": {"lr": 0.1},
                                         "donor_step": 12, "donor_checkpoint": "x"}))
    assert (seq, d) == (7, Decision("exploit", donor=2, params={"lr": 0.1}, donor_step=12))
    assert Decision.from_dict({"action": "stop", "reason": "r", "hint": "x"}) == Decision("stop", "r")


def test_reports_that_never_reach_the_bus_say_why_on_stderr_and_in_the_termination_message(
        tmp_path, monkeypatch, capsys):
    """A trial that can never reach the bus (a wrong password or CA) trains on and exits 0, and its reports
    are lost: without a word from the SDK it reads as a trainer that reported nothing. It says so once while
    training, and at exit how many reports were lost and why, where the trial's reason picks it up."""
    import socket

    from kubetune.bus import TrialClient, redis_bus
    from kubetune.trial import _BusChannel

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    termination = tmp_path / "termination-log"
    termination.write_text("")
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    bus = redis_bus(url=f"redis://127.0.0.1:{port}/0")
    channel = _BusChannel(TrialClient(bus, "ns/exp", 0, wait_s=0.1, close_retry_s=0.3))
    for step in range(1, 4):
        assert channel.send(step, {"score": 0.5}).action == "continue"
    channel.close()
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kubetune.trial: ")]
    assert len(said) == 2, said
    assert said[0].startswith("kubetune.trial: the metric bus is unreachable (ConnectionError: ")
    assert said[1].startswith("kubetune.trial: 3 reports never reached the metric bus: ConnectionError: ")
    assert termination.read_text() == said[1] + "\n"


def test_a_trial_that_reported_nothing_gets_the_sdks_last_word_as_its_reason(tmp_path):
    """`kubetune run`: a trial that exits 0 without a value fails, and its reason carries the SDK's line
    about reports that never reached the bus."""
    trial = _one_trial_run(tmp_path, "lost", "import sys; print('training'); print('kubetune.trial: 3 reports "
                                             "never reached the metric bus: ConnectionError: refused', file=sys.stderr)")
    assert trial["state"] == "Failed"
    assert trial["reason"] == ("no value for objective metric 'score' was reported: kubetune.trial: 3 reports "
                               "never reached the metric bus: ConnectionError: refused")


def test_a_trial_whose_bus_came_back_is_not_said_to_have_lost_its_reports(tmp_path):
    """`kubetune run`: the bus was unreachable for a while (the SDK said so once, while training), then came
    back and took every report; the trial exits 0 without a value of the objective (it reported another
    metric). Its reason carried that passing warning, sending the user after a bus that lost nothing."""
    trial = _one_trial_run(tmp_path, "flap", "import sys; print('kubetune.trial: the metric bus is unreachable "
                                             "(ConnectionError: refused); reports are kept and sent again, training "
                                             "goes on', file=sys.stderr); print('training')")
    assert (trial["state"], trial["reason"]) == ("Failed", "no value for objective metric 'score' was reported")


def _one_trial_run(tmp_path, name: str, code: str) -> dict:
    """`kubetune run` of one trial, `python -c code`, that reports nothing; its record."""
    from tests.test_local_run import journal, kubetune, write_spec

    spec = write_spec(tmp_path / f"{name}.yaml", name, {
        "objective": {"metric": "score", "goal": "maximize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "algorithm": {"name": "random", "settings": {"seed": 1}},
        "budget": {"maxTrials": 1, "parallelTrials": 1},
        "trialTemplate": {"command": ["python", "-c", code]}})
    kubetune("run", str(spec), "--json", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    [trial] = journal(tmp_path / "state", name).values()
    return trial
