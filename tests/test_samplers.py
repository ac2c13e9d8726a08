"""Every sampler: determinism, parallel asks, legal values, rebuilds, warm start, and (for the
model-based ones) that the model actually helps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kubetune import Study
from kubetune.api.space import SearchSpace
from kubetune.api.trial import Trial, TrialState
from kubetune.api.validation import SpecError
from kubetune.suggestion import SAMPLERS, make_sampler
from kubetune.suggestion.bohb import FINAL, BOHBSampler, budget_observations

ALL = sorted(SAMPLERS)
MODEL_BASED = ["tpe", "gp", "cmaes", "evolution", "bohb"]

MIXED = [
    {"name": "lr", "type": "double", "min": 1e-5, "max": 1.0, "log": True},
    {"name": "layers", "type": "int", "min": 1, "max": 6},
    {"name": "width", "type": "int", "min": 8, "max": 512, "log": True},
    {"name": "dropout", "type": "double", "min": 0.0, "max": 0.5, "step": 0.1},
    {"name": "batch", "type": "discrete", "values": [16, 32, 64, 128]},
    {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd", "rmsprop"]},
    {"name": "momentum", "type": "double", "min": 0.5, "max": 0.99, "when": {"optimizer": "sgd"}},
    {"name": "nesterov", "type": "categorical", "values": [True, False], "when": {"optimizer": "sgd"}},
]

# The same, small enough to enumerate.
GRID_MIXED = [dict(p, max=16) if p["name"] == "width" else p for p in MIXED]


def mixed_loss(p: dict) -> float:
    loss = (math.log10(p["lr"]) + 2.5) ** 2 + (p["layers"] - 3) ** 2 / 4 + (math.log2(p["width"]) - 7) ** 2 / 8
    loss += (p["dropout"] - 0.2) ** 2 + {16: 0.3, 32: 0.0, 64: 0.1, 128: 0.4}[p["batch"]]
    loss += {"adam": 0.5, "sgd": 0.0, "rmsprop": 0.8}[p["optimizer"]]
    if p["optimizer"] == "sgd":
        loss += (p["momentum"] - 0.9) ** 2 * 4 + (0.0 if p["nesterov"] else 0.2)
    return loss


def sphere_params(d: int = 3) -> list[dict]:
    return [{"name": f"x{i}", "type": "double", "min": -5.0, "max": 5.0} for i in range(d)]


def sphere(p: dict, centre: float = 0.0) -> float:
    return sum((v - centre) ** 2 for v in p.values())


def run(name: str, params, loss, n: int, seed: int = 0, prior=(), settings=None) -> Study:
    if name == "grid" and params is MIXED:
        params = GRID_MIXED
    study = Study(parameters=params, algorithm={"name": name, "settings": {"seed": seed, **(settings or {})}},
                  goal="minimize", prior=prior)
    for _ in range(n):
        t = study.ask()
        study.tell(t, loss(t.params))
    return study


def test_the_documented_form_works_for_tpe():
    study = Study(parameters=[{"name": "x", "type": "double", "min": -5, "max": 5}],
                  algorithm={"name": "tpe", "settings": {"seed": 0}}, goal="minimize")
    t = study.ask()
    study.tell(t, 0.123)
    assert study.best_value == 0.123


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_sequence(name):
    a = run(name, MIXED, mixed_loss, 22, seed=3)
    b = run(name, MIXED, mixed_loss, 22, seed=3)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    c = run(name, MIXED, mixed_loss, 22, seed=4)
    if name != "grid":
        assert [t.params for t in a.trials] != [t.params for t in c.trials]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("finished", [0, 16])
def test_parallel_asks_are_distinct(name, finished):
    study = run(name, MIXED, mixed_loss, finished, seed=1)
    pending = [study.ask() for _ in range(8)]
    keys = {study.space.key(t.params) for t in pending}
    assert len(keys) == 8
    # Also distinct from everything tried before.
    earlier = {study.space.key(t.params) for t in study.trials[:finished]}
    assert not keys & earlier


def check_legal(space: SearchSpace, params: dict) -> None:
    assert space.canonical(params) == params  # exactly the active parameters, already legal
    for p in space:
        if not space.is_active(p, params):
            assert p.name not in params
            continue
        v = params[p.name]
        if p.type == "double":
            assert isinstance(v, float) and p.low <= v <= p.high
            if p.step:
                assert abs((v - p.low) / p.step - round((v - p.low) / p.step)) < 1e-9
        elif p.type == "int":
            assert isinstance(v, int) and not isinstance(v, bool) and p.low <= v <= p.high
        else:
            assert v in p.values


@pytest.mark.parametrize("name", ALL)
def test_suggestions_are_legal(name):
    study = run(name, MIXED, mixed_loss, 40, seed=2)
    for t in study.trials:
        check_legal(study.space, t.params)
    # Both branches of the condition were explored.
    assert {t.params["optimizer"] for t in study.trials} >= {"sgd", "adam"}
    # Log scale: the draws spread over decades, not just the top one.
    assert min(t.params["lr"] for t in study.trials) < 1e-2


def copy_trials(trials):
    return [Trial.from_dict(t.to_dict()) for t in trials]


@pytest.mark.parametrize("name", ALL)
def test_rebuilt_sampler_continues_identically(name):
    params = GRID_MIXED if name == "grid" else MIXED
    study = Study(parameters=params, algorithm={"name": name, "settings": {"seed": 5}})
    for i in range(34):
        t = study.ask()
        if i % 11 == 7:
            study.tell(t, None)  # failed
        elif i % 13 == 5:
            pass  # still running
        else:
            study.tell(t, mixed_loss(t.params))
        if i % 9 == 0:
            # Interleaved asks on the long-lived sampler must match a fresh one at every point.
            fresh = make_sampler(name, study.space, seed=5, goal="minimize")
            assert fresh.ask(copy_trials(study.trials)) == study.sampler.ask(study.trials)
    fresh = make_sampler(name, study.space, seed=5, goal="minimize")
    assert fresh.ask(copy_trials(study.trials)) == study.sampler.ask(study.trials)


def test_cmaes_replay_notices_a_changed_trial():
    study = run("cmaes", sphere_params(4), sphere, 30, seed=0)
    study.sampler.ask(study.trials)  # the cached replay now covers all 30 trials
    study.trials[3].value = 1e6  # e.g. a corrected result
    fresh = make_sampler("cmaes", study.space, seed=0, goal="minimize")
    assert study.sampler.ask(study.trials) == fresh.ask(copy_trials(study.trials))


def test_cmaes_generations_follow_the_finished_prefix():
    study = run("cmaes", sphere_params(4), sphere, 20, seed=0)
    popsize = study.sampler._state(study.trials).cma.popsize
    assert study.sampler._state(study.trials).cma.generation == 20 // popsize
    # A pending trial holds later results back until it finishes.
    study.trials[2].state, study.trials[2].value = TrialState.RUNNING, None
    fresh = make_sampler("cmaes", study.space, seed=0, goal="minimize")
    assert fresh._state(study.trials).cma.generation == 0
    assert len(fresh._state(study.trials).consumed) == 2


def test_cmaes_restarts_with_a_larger_population_when_converged():
    flat = run("cmaes", sphere_params(2), lambda p: 1.0, 150, seed=0)
    replay = flat.sampler._state(flat.trials)
    assert replay.restarts >= 1
    assert replay.cma.popsize == 6 * 2 ** replay.restarts  # 4 + 3 ln 2, doubled per restart


def test_cmaes_warm_start_asks_the_transferred_mean_first():
    """The first trial of a warm start is the WS-CMA-ES mean; later asks are draws, and a cold
    start asks no mean."""
    from kubetune.suggestion._cma import warm_start

    rng = np.random.default_rng(0)
    space = SearchSpace.from_spec(sphere_params())
    prior = []
    for _ in range(30):
        p = space.sample(rng)
        prior.append({"params": p, "value": sphere(p, 1.0)})
    names = list(prior[0]["params"])
    rows = np.array([[(t["params"][k] + 5) / 10 for k in names] for t in prior])
    mean = warm_start(rows, np.array([t["value"] for t in prior]))[0]
    warm = run("cmaes", sphere_params(), sphere, 5, seed=3, prior=prior)
    first = warm.trials[0].params
    assert [first[k] for k in names] == pytest.approx(list(mean * 10 - 5))
    assert all(t.params != first for t in warm.trials[1:])
    cold = run("cmaes", sphere_params(), sphere, 1, seed=3).trials[0].params
    assert any(abs(v) > 1e-6 for v in cold.values())


def test_cmaes_warm_start_gaussian_sits_on_the_best_solutions_basin():
    """WS-CMA-ES's estimate from the promising solutions on the best one's mode of the mixture:
    the paper's estimate when they form one cluster, that cluster's alone when they form two."""
    from kubetune.suggestion._cma import warm_start

    rng = np.random.default_rng(1)
    near = 0.2 + 0.02 * rng.standard_normal((6, 3))
    far = 0.8 + 0.02 * rng.standard_normal((4, 3))
    rest = rng.random((90, 3))

    def paper(points):
        centred = points - points.mean(axis=0)
        return points.mean(axis=0), 0.01 * np.eye(3) + centred.T @ centred / len(points)

    for top, expected in [(near, near), (np.vstack([near, far]), near), (np.vstack([far, near]), far)]:
        rows = np.vstack([top, rest])
        loss = np.arange(len(rows), dtype=float)  # the promising ones first, in the order given
        mean, sigma, cov = warm_start(rows, loss, gamma=len(top) / len(rows), alpha=0.1)
        want_mean, want_cov = paper(expected)
        assert np.allclose(mean, want_mean)
        assert np.allclose(sigma ** 2 * cov, want_cov)


@pytest.mark.parametrize("name", MODEL_BASED)
def test_warm_start_helps_early(name):
    """Prior trials of a slightly different task put the first suggestions near its optimum."""
    centre = 2.5
    rng = np.random.default_rng(0)
    space = SearchSpace.from_spec(sphere_params())
    prior = []
    for _ in range(40):
        p = space.sample(rng)
        prior.append({"params": p, "value": sphere(p, centre - 0.2)})
    loss = lambda p: sphere(p, centre)  # noqa: E731
    cold, warm = [], []
    for seed in range(3):
        cold.append(np.median([loss(t.params) for t in run(name, sphere_params(), loss, 10, seed).trials]))
        warm.append(np.median([loss(t.params) for t in run(name, sphere_params(), loss, 10, seed, prior=prior).trials]))
    assert np.median(warm) < 0.5 * np.median(cold)


@pytest.mark.parametrize("name", MODEL_BASED)
def test_model_beats_random_on_a_sphere(name):
    seeds = range(9)
    ours = np.median([run(name, sphere_params(), sphere, 40, s).best_value for s in seeds])
    rand = np.median([run("random", sphere_params(), sphere, 40, s).best_value for s in seeds])
    assert ours < 0.6 * rand


@pytest.mark.parametrize("name", ["tpe", "gp", "cmaes"])
def test_maximize_is_minimize_of_the_negation(name):
    lo = run(name, sphere_params(2), sphere, 20, seed=1)
    hi = Study(parameters=sphere_params(2), algorithm={"name": name, "settings": {"seed": 1}}, goal="maximize")
    for _ in range(20):
        t = hi.ask()
        hi.tell(t, -sphere(t.params))
    assert [t.params for t in lo.trials] == [t.params for t in hi.trials]


def test_bohb_uses_the_largest_budget_with_enough_observations():
    space = SearchSpace.from_spec(sphere_params(2))
    rng = np.random.default_rng(0)
    trials = []
    for i in range(30):
        p = space.sample(rng)
        steps = [1, 3] if i < 6 else [1]  # only six trials reached budget 3
        trials.append(Trial(number=i, params=p, state=TrialState.PRUNED,
                            intermediate=[[s, sphere(p) / s] for s in steps]))
    obs = budget_observations(trials, 1.0)
    assert len(obs[1.0]) == 30 and len(obs[3.0]) == 6 and FINAL not in obs
    sampler = BOHBSampler(space, seed=0, settings={"minPointsInModel": 3})
    good, bad = sampler.model(trials)
    assert good.n + bad.n == 6  # budget 3 qualifies (3 + 2 observations needed)
    sampler = BOHBSampler(space, seed=0, settings={"minPointsInModel": 5})
    good, bad = sampler.model(trials)
    assert good.n + bad.n == 30  # falls back to budget 1


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(SpecError) as err:
        Study(parameters=sphere_params(), algorithm={"name": "tpe", "settings": {"startupTrial": 5}})
    assert "algorithm.settings.startupTrial" in str(err.value)
    with pytest.raises(SpecError) as err:
        Study(parameters=sphere_params(), algorithm={"name": "gp", "settings": {"maxPoints": 1}})
    assert "algorithm.settings.maxPoints" in str(err.value)


@pytest.mark.parametrize("gap", [0.0, 3.0, 40.0])
def test_gp_log_ei_gradient_matches_finite_differences(gap):
    """The analytic gradient the GP's acquisition ascent follows, also far in the tail of EI."""
    from kubetune.suggestion._gp import GP, log_ei, log_ei_and_grad

    rng = np.random.default_rng(0)
    x = rng.random((25, 3))
    y = np.sin(4 * x).sum(1)
    gp = GP(x, (y - y.mean()) / y.std())
    xs = rng.random((6, 3))
    best = ((y - y.mean()) / y.std()).min() - gap
    value, grad = log_ei_and_grad(gp, xs, best)
    mean, sd = gp.predict(xs)
    assert np.allclose(value, log_ei(mean, sd, best))
    eps = 1e-6
    numeric = np.empty_like(grad)
    for d in range(3):
        step = np.eye(3)[d] * eps
        up, down = gp.predict(xs + step), gp.predict(xs - step)
        numeric[:, d] = (log_ei(*up, best) - log_ei(*down, best)) / (2 * eps)
    assert np.allclose(grad, numeric, rtol=1e-3, atol=1e-3 * np.abs(numeric).max())


def test_gp_climbs_log_ei_in_ten_dimensions():
    """In 10-D the gradient ascent finds higher log-EI than the candidates it starts from."""
    from kubetune.suggestion._gp import GP, log_ei
    from kubetune.suggestion.gp import features

    space = [{"name": f"x{i}", "type": "double", "min": -1.0, "max": 1.0} for i in range(10)]
    study = run("gp", space, lambda p: sum(v * v for v in p.values()), 20, seed=0)
    sampler = study.sampler
    hist = sampler.history(study.trials)
    y = (hist.loss - hist.loss.mean()) / hist.loss.std()
    gp = GP(features(sampler.encoder, hist.rows), y)
    starts = sampler.encoder.random_rows(np.random.default_rng(1), 4)
    climbed = sampler._ascend(gp, y.min(), starts)
    before = log_ei(*gp.predict(features(sampler.encoder, starts)), y.min())
    after = log_ei(*gp.predict(features(sampler.encoder, climbed)), y.min())
    assert (after >= before - 1e-9).all() and (after > before + 1e-3).any()
