"""Bad specs are refused before anything runs, one line per problem naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import yaml

from kubetune.api.validation import SpecError, load_experiment

VALID = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "Experiment",
    "metadata": {"name": "demo"},
    "spec": {
        "objective": {"metric": "val_accuracy", "goal": "maximize", "target": 0.99},
        "parameters": [
            {"name": "lr", "type": "double", "min": 1e-5, "max": 0.1, "log": True},
            {"name": "layers", "type": "int", "min": 1, "max": 4},
            {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd"]},
            {"name": "momentum", "type": "double", "min": 0.5, "max": 0.99, "when": {"optimizer": "sgd"}},
            {"name": "batch", "type": "discrete", "values": [32, 64, 128]},
        ],
        "algorithm": {"name": "random", "settings": {"seed": 1}},
        "budget": {"maxTrials": 20, "parallelTrials": 4, "maxFailedTrials": 3, "timeout": "2h", "trialTimeout": "10m"},
        "trialTemplate": {"command": ["python", "train.py", "--lr", "${lr}"], "image": "kubetune/trial:latest"},
    },
}


def mutate(fn):
    doc = copy.deepcopy(VALID)
    fn(doc)
    return doc


def setp(path, value):
    """A mutation that sets doc[path...] = value."""
    def fn(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return fn


def delp(path):
    def fn(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return fn


def make_cycle(doc):
    params = doc["spec"]["parameters"]
    params[2]["when"] = {"batch": 32}  # optimizer needs batch ...
    params[4]["when"] = {"optimizer": "adam"}  # ... and batch needs optimizer


P = ("spec", "parameters")
CASES = [
    # (id, mutation, expected path, fragment of the message)
    ("max-below-min", setp(P + (1, "max"), 0), "spec.parameters[1].max", "must be greater than min (min=1, max=0)"),
    ("max-equals-min", setp(P + (0, "max"), 1e-5), "spec.parameters[0].max", "must be greater than min"),
    ("log-with-nonpositive-min", setp(P + (0, "min"), 0), "spec.parameters[0].min", "greater than 0 on a log scale"),
    ("unknown-type", setp(P + (1, "type"), "float"), "spec.parameters[1].type", "must be one of double, int, categorical, discrete"),
    ("double-without-max", delp(P + (3, "max")), "spec.parameters[3].max", "required for a double parameter"),
    ("categorical-without-values", delp(P + (2, "values")), "spec.parameters[2].values", "required for a categorical parameter"),
    ("categorical-with-min", setp(P + (2, "min"), 1), "spec.parameters[2].min", "not allowed for a categorical parameter"),
    ("empty-values", setp(P + (2, "values"), []), "spec.parameters[2].values", "at least 1 item"),
    ("duplicate-values", setp(P + (2, "values"), ["adam", "adam"]), "spec.parameters[2].values", "duplicate value 'adam'"),
    ("discrete-non-number", setp(P + (4, "values"), [32, "big"]), "spec.parameters[4].values[1]", "takes numbers"),
    ("int-fractional-bound", setp(P + (1, "max"), 4.5), "spec.parameters[1].max", "whole number"),
    ("step-with-log", setp(P + (0, "step"), 0.01), "spec.parameters[0].step", "cannot be combined with log"),
    ("negative-step", setp(P + (1, "step"), -1), "spec.parameters[1].step", "must be greater than 0"),
    ("duplicate-name", setp(P + (1, "name"), "lr"), "spec.parameters[1].name", "duplicate parameter name 'lr'"),
    ("bad-name", setp(P + (1, "name"), "1layers"), "spec.parameters[1].name", "not a valid name"),
    ("when-unknown-parent", setp(P + (3, "when"), {"optimiser": "sgd"}), "spec.parameters[3].when.optimiser", "did you mean 'optimizer'?"),
    ("when-unknown-value", setp(P + (3, "when"), {"optimizer": "rmsprop"}), "spec.parameters[3].when.optimizer", "'rmsprop' is not one of optimizer's values"),
    ("when-numeric-parent", setp(P + (3, "when"), {"lr": 0.1}), "spec.parameters[3].when.lr", "conditions need a categorical or discrete parent"),
    ("no-parameters", setp(P, []), "spec.parameters", "at least 1 item"),
    ("unknown-field-near-miss", setp(("spec", "paramters"), []), "spec.paramters", "did you mean 'parameters'?"),
    ("unknown-field-in-parameter", setp(P + (0, "maximum"), 3), "spec.parameters[0].maximum", "did you mean 'max'?"),
    ("missing-objective", delp(("spec", "objective")), "spec.objective", "required field is missing"),
    ("bad-goal", setp(("spec", "objective", "goal"), "maximise"), "spec.objective.goal", "did you mean 'maximize'?"),
    ("unknown-algorithm", setp(("spec", "algorithm", "name"), "randm"), "spec.algorithm.name", "known: "),
    ("unknown-algorithm-setting", setp(("spec", "algorithm", "settings"), {"sead": 1}), "spec.algorithm.settings.sead", "did you mean 'seed'?"),
    ("bad-setting-type", setp(("spec", "algorithm", "settings"), {"seed": "one"}), "spec.algorithm.settings.seed", "expected an integer"),
    ("unknown-early-stopping", setp(("spec", "earlyStopping"), {"name": "nope"}), "spec.earlyStopping.name", "unknown early-stopping method"),
    ("zero-max-trials", setp(("spec", "budget", "maxTrials"), 0), "spec.budget.maxTrials", "must be at least 1"),
    ("string-max-trials", setp(("spec", "budget", "maxTrials"), "ten"), "spec.budget.maxTrials", "expected an integer"),
    ("parallel-over-max", setp(("spec", "budget", "parallelTrials"), 50), "spec.budget.parallelTrials", "greater than maxTrials"),
    ("bad-duration", setp(("spec", "budget", "timeout"), "2 hours"), "spec.budget.timeout", "expected a duration such as 90s"),
    ("missing-command", delp(("spec", "trialTemplate", "command")), "spec.trialTemplate.command", "required field is missing"),
    ("command-not-list", setp(("spec", "trialTemplate", "command"), "python train.py"), "spec.trialTemplate.command", "expected a list"),
    ("unknown-placeholder", setp(("spec", "trialTemplate", "command"), ["python", "t.py", "${learning_rate}"]), "spec.trialTemplate.command[2]", "${learning_rate} names no parameter"),
    ("bad-metric-regex", setp(("spec", "metricsCollector"), {"format": "([a-z]+"}), "spec.metricsCollector.format", "not a valid regular expression"),
    ("metric-regex-one-group", setp(("spec", "metricsCollector"), {"format": "acc=([0-9.]+)"}), "spec.metricsCollector.format", "needs two groups"),
    ("bad-name-metadata", setp(("metadata", "name"), "My_Experiment"), "metadata.name", "not a valid name"),
    ("wrong-kind", setp(("kind",), "Trial"), "kind", "must be one of Experiment"),
    ("wrong-api-version", setp(("apiVersion",), "kubeflow.org/v1beta1"), "apiVersion", "must be one of kubetune.io/v1alpha1"),
    ("condition-cycle", make_cycle, "spec.parameters", "conditions form a cycle"),
]


def test_the_base_spec_is_valid():
    load_experiment(yaml.safe_dump(VALID))


@pytest.mark.parametrize("mutation,path,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec_names_the_field(mutation, path, fragment):
    with pytest.raises(SpecError) as err:
        load_experiment(yaml.safe_dump(mutate(mutation)), "exp.yaml")
    lines = err.value.lines()
    matching = [line for line in lines if f" {path}: " in line]
    assert matching, f"no problem reported at {path}; got {lines}"
    assert any(fragment in line for line in matching), f"{fragment!r} not in {matching}"


def test_there_are_at_least_25_distinct_cases():
    assert len({c[2] + c[3] for c in CASES}) >= 25


def test_every_problem_is_reported_at_once():
    doc = mutate(setp(P + (1, "max"), 0))
    doc["spec"]["budget"]["maxTrials"] = 0
    doc["spec"]["parameters"][2]["min"] = 3
    with pytest.raises(SpecError) as err:
        load_experiment(yaml.safe_dump(doc))
    paths = {p.path for p in err.value.problems}
    assert {"spec.parameters[1].max", "spec.parameters[2].min", "spec.budget.maxTrials"} <= paths


def test_problems_carry_the_yaml_line():
    text = textwrap.dedent("""\
        apiVersion: kubetune.io/v1alpha1
        kind: Experiment
        metadata: {name: demo}
        spec:
          objective: {metric: acc, goal: maximize}
          parameters:
            - {name: x, type: double, min: 5, max: 1}
          trialTemplate: {command: [python, t.py]}
        """)
    with pytest.raises(SpecError) as err:
        load_experiment(text, "exp.yaml")
    assert err.value.lines() == ["exp.yaml:7: spec.parameters[0].max: must be greater than min (min=5, max=1)"]


def test_yaml_syntax_error_gives_the_line():
    text = "apiVersion: kubetune.io/v1alpha1\nkind: Experiment\nspec:\n  parameters: [a, b\n  objective: x\n"
    with pytest.raises(SpecError) as err:
        load_experiment(text, "broken.yaml")
    (line,) = err.value.lines()
    assert line.startswith("broken.yaml:") and "syntax error" in line
    assert int(line.split(":")[1]) in (4, 5, 6)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_validate_command_exits_2_and_run_writes_nothing(tmp_path):
    bad = mutate(setp(P + (1, "max"), 0))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = _cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "spec.parameters[1].max: must be greater than min (min=1, max=0)" in result.stderr
    run = _cli("run", str(path), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert run.returncode == 2
    assert "spec.parameters[1].max" in run.stderr
    assert not (tmp_path / "state").exists()


def test_validate_command_accepts_a_good_spec(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(VALID))
    result = _cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid Experiment 'demo'" in result.stdout


def test_settings_command_lists_what_validation_accepts(tmp_path):
    """`kubetune settings` lists every algorithm and early-stopping method with each of the settings the
    validation accepts; a name narrows it (both kinds for bohb); an unknown name is refused with a hint."""
    from kubetune.schedulers import SCHEDULERS
    from kubetune.suggestion import SAMPLERS

    listing = _cli("settings", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    for field, table in (("algorithm", SAMPLERS), ("earlyStopping", SCHEDULERS)):
        for name, cls in table.items():
            assert f"{field}.name: {name}" in listing.stdout
            for key in cls.SETTINGS:
                assert f"  {key} " in listing.stdout
    one = _cli("settings", "cmaes", cwd=tmp_path)
    assert one.returncode == 0 and "categoricalExploration" in one.stdout and "earlyStopping" not in one.stdout
    both = _cli("settings", "bohb", cwd=tmp_path).stdout
    assert "algorithm.name: bohb" in both and "earlyStopping.name: bohb" in both
    wrong = _cli("settings", "tpx", cwd=tmp_path)
    assert wrong.returncode == 2 and "did you mean 'tpe'?" in wrong.stderr
