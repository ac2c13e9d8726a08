"""The search space and the foundation samplers (random, grid, Sobol)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kubetune import Study
from kubetune.api.space import Parameter, SearchSpace
from kubetune.api.trial import TrialState

SPACE = [
    {"name": "lr", "type": "double", "min": 1e-5, "max": 0.1, "log": True},
    {"name": "layers", "type": "int", "min": 1, "max": 4},
    {"name": "units", "type": "int", "min": 16, "max": 512, "log": True},
    {"name": "dropout", "type": "double", "min": 0.0, "max": 0.5, "step": 0.1},
    {"name": "batch", "type": "discrete", "values": [16, 32, 64]},
    {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd"]},
    {"name": "momentum", "type": "double", "min": 0.5, "max": 0.99, "when": {"optimizer": "sgd"}},
    {"name": "nesterov", "type": "categorical", "values": [True, False], "when": {"optimizer": ["sgd"]}},
]


# A grid needs a finite space of a sensible size: units gets a step there.
GRID_SPACE = [dict(p, step=124, log=False) if p["name"] == "units" else p for p in SPACE]


def space_for(algorithm):
    return GRID_SPACE if algorithm == "grid" else SPACE


def check_config(config):
    assert 1e-5 <= config["lr"] <= 0.1 and isinstance(config["lr"], float)
    assert config["layers"] in (1, 2, 3, 4) and isinstance(config["layers"], int)
    assert 16 <= config["units"] <= 512 and isinstance(config["units"], int)
    assert any(math.isclose(config["dropout"], k / 10) for k in range(6))
    assert config["batch"] in (16, 32, 64)
    if config["optimizer"] == "sgd":
        assert 0.5 <= config["momentum"] <= 0.99 and config["nesterov"] in (True, False)
    else:
        assert "momentum" not in config and "nesterov" not in config


@pytest.mark.parametrize("algorithm", ["random", "sobol", "grid"])
def test_samplers_respect_types_bounds_steps_and_conditions(algorithm):
    study = Study(parameters=space_for(algorithm), algorithm={"name": algorithm, "settings": {"seed": 4}})
    seen = set()
    for _ in range(60):
        t = study.ask()
        check_config(t.params)
        seen.add(t.params["optimizer"])
        study.tell(t, 1.0)
    assert seen == {"adam", "sgd"}


@pytest.mark.parametrize("algorithm", ["random", "sobol", "grid"])
def test_same_seed_same_suggestions(algorithm):
    def run():
        study = Study(parameters=space_for(algorithm), algorithm={"name": algorithm, "settings": {"seed": 11}})
        out = []
        for _ in range(20):
            t = study.ask()
            out.append(t.params)
            study.tell(t, float(len(out)))
        return out

    assert run() == run()


@pytest.mark.parametrize("algorithm", ["random", "sobol", "grid"])
def test_eight_pending_asks_are_distinct(algorithm):
    study = Study(parameters=space_for(algorithm), algorithm={"name": algorithm, "settings": {"seed": 2}})
    pending = [study.ask() for _ in range(8)]
    assert len({study.space.key(t.params) for t in pending}) == 8


@pytest.mark.parametrize("algorithm", ["random", "sobol", "grid"])
def test_a_rebuilt_study_continues_the_same_sequence(algorithm):
    settings = {"seed": 8}
    long_lived = Study(parameters=space_for(algorithm), algorithm={"name": algorithm, "settings": settings})
    for i in range(7):
        long_lived.tell(long_lived.ask(), float(i))
    rebuilt = Study(parameters=space_for(algorithm), algorithm={"name": algorithm, "settings": settings},
                    trials=[type(t).from_dict(t.to_dict()) for t in long_lived.trials])
    assert rebuilt.ask().params == long_lived.ask().params


def test_different_seeds_differ():
    a = Study(parameters=SPACE, algorithm={"name": "random", "settings": {"seed": 1}}).ask().params
    b = Study(parameters=SPACE, algorithm={"name": "random", "settings": {"seed": 2}}).ask().params
    assert a != b


def test_a_seedless_study_draws_and_keeps_a_seed():
    study = Study(parameters=SPACE)
    again = Study(parameters=SPACE, seed=study.seed)
    assert study.ask().params == again.ask().params


def test_log_scale_spreads_over_decades():
    study = Study(parameters=[SPACE[0]], algorithm={"name": "sobol", "settings": {"seed": 0}})
    values = [study.ask().params["lr"] for _ in range(256)]
    decades = np.histogram(np.log10(values), bins=4, range=(-5, -1))[0]
    assert all(40 <= n <= 90 for n in decades), decades  # about 64 each


def test_int_values_are_equally_likely_at_the_edges():
    p = Parameter.from_spec({"name": "k", "type": "int", "min": 1, "max": 4})
    counts = np.bincount([p.from_unit(u) for u in np.linspace(0, 1, 4000, endpoint=False)], minlength=5)[1:]
    assert list(counts) == [1000, 1000, 1000, 1000]


@pytest.mark.parametrize("spec", SPACE[:6])
def test_unit_mapping_round_trips(spec):
    p = Parameter.from_spec(spec)
    rng = np.random.default_rng(0)
    for u in rng.random(50):
        value = p.from_unit(u)
        assert p.contains(value)
        assert p.from_unit(p.to_unit(value)) == value


def test_a_grid_too_large_to_finish_is_refused():
    from kubetune.api.validation import SpecError

    with pytest.raises(SpecError, match="the grid has more than 1000000 points"):
        Study(parameters=SPACE, algorithm={"name": "grid"})


def test_grid_covers_every_combination_once_then_is_exhausted():
    params = [{"name": "a", "type": "int", "min": 1, "max": 3},
              {"name": "b", "type": "categorical", "values": ["x", "y"]},
              {"name": "c", "type": "double", "min": 0, "max": 1, "when": {"b": "y"}}]
    study = Study(parameters=params, algorithm={"name": "grid", "settings": {"points": 3}})
    configs = []
    from kubetune import SearchExhausted

    with pytest.raises(SearchExhausted):
        while True:
            t = study.ask()
            configs.append(t.params)
            study.tell(t, 0.0)
    assert len(configs) == 3 * (1 + 3)
    assert {c["c"] for c in configs if "c" in c} == {0.0, 0.5, 1.0}
    assert len({study.space.key(c) for c in configs}) == len(configs)


def test_tell_records_states_and_best():
    study = Study(parameters=SPACE[:2], goal="maximize", algorithm={"name": "random", "settings": {"seed": 0}})
    a, b, c = study.ask(), study.ask(), study.ask()
    study.tell(a, 0.5)
    study.tell(b, float("nan"))
    study.tell(c, None)
    assert [t.state for t in study.trials] == [TrialState.SUCCEEDED, TrialState.FAILED, TrialState.FAILED]
    assert study.best_trial is a and study.best_value == 0.5


def test_canonical_drops_inactive_and_snaps():
    space = SearchSpace.from_spec(SPACE)
    config = space.canonical({"lr": 0.5, "layers": 2.4, "units": 64, "dropout": 0.23, "batch": 30,
                              "optimizer": "adam", "momentum": 0.7, "nesterov": True})
    assert config == {"lr": 0.1, "layers": 2, "units": 64, "dropout": 0.2, "batch": 32, "optimizer": "adam"}
