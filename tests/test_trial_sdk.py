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
