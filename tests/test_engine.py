"""The engine as a pure state machine: a fake clock and a simulated runtime drive it."""

from __future__ import annotations

import heapq
import itertools

import pytest

from kubetune.api.spec import ExperimentSpec
from kubetune.api.trial import TrialState
from kubetune.engine import Engine, Launch, Stop
from kubetune.study import Study


def make_spec(budget=None, objective=None, parameters=None, algorithm=None, early_stopping=None):
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "sim"},
        "spec": {
            "objective": objective or {"metric": "loss", "goal": "minimize"},
            "parameters": parameters or [{"name": "x", "type": "double", "min": -5, "max": 5},
                                         {"name": "y", "type": "int", "min": 0, "max": 10}],
            "algorithm": algorithm or {"name": "random", "settings": {"seed": 3}},
            "budget": budget or {"maxTrials": 12, "parallelTrials": 3},
            "trialTemplate": {"command": ["true"]},
        },
    }
    if early_stopping:
        doc["spec"]["earlyStopping"] = early_stopping
    return ExperimentSpec.from_document(doc)


def make_engine(spec, trials=(), now=0.0):
    study = Study(parameters=spec.parameters, algorithm=spec.algorithm, goal=spec.objective.goal, trials=trials,
                  early_stopping=spec.early_stopping)
    return Engine(spec, study, now)


class Simulator:
    """Runs launched trials on a simulated clock. `behaviour(params)` returns
    (duration, values, exit_code): the trial reports `values` evenly over its
    duration, then exits with exit_code (None: it hangs until stopped)."""

    def __init__(self, engine, behaviour):
        self.engine, self.behaviour = engine, behaviour
        self.now = 0.0
        self.queue: list = []
        self.seq = itertools.count()
        self.max_running = 0
        self.launches: list[int] = []
        self.cancelled: set[int] = set()
        self.decisions: list[tuple[int, float, str]] = []
        self.run_of: dict[int, int] = {}

    def push(self, t, kind, number, payload=None):
        heapq.heappush(self.queue, (t, next(self.seq), kind, number, (self.run_of.get(number, 0), payload)))

    def apply(self, actions):
        for a in actions:
            if isinstance(a, Launch):
                n = a.trial.number
                self.launches.append(n)
                self.engine.on_started(n, self.now)
                duration, values, code = self.behaviour(a.trial.params)
                self.cancelled.discard(n)
                self.run_of[n] = self.run_of.get(n, 0) + 1  # events of an earlier run of it are stale
                done = int(a.trial.last_step or 0)  # a resumed trial goes on from its checkpoint
                for i, v in enumerate(values, 1):
                    if i > done:
                        self.push(self.now + duration * (i - done) / (len(values) + 1), "report", n, (i, v))
                if code is not None:
                    self.push(self.now + duration, "exit", n, code)
            elif isinstance(a, Stop):
                self.cancelled.add(a.number)
                self.push(self.now + 0.5, "exit", a.number, -15)

    def run(self, limit=10_000.0):
        while not self.engine.done:
            self.apply(self.engine.step(self.now))
            self.max_running = max(self.max_running, self.engine.count(TrialState.RUNNING))
            if self.engine.done:
                break
            if not self.queue:
                self.now += 1.0  # nothing scheduled: let time pass (timeouts)
                assert self.now < limit, "simulation did not end"
                continue
            self.advance()
        return self.engine

    def advance(self):
        """Delivers the next scheduled event to the engine."""
        t, _, kind, n, (run, payload) = heapq.heappop(self.queue)
        self.now = max(self.now, t)
        if self.engine.trials[n].state != TrialState.RUNNING or run != self.run_of.get(n, 0):
            return  # an event of a trial that is already over, or of an earlier run of it
        if kind == "report" and n not in self.cancelled:
            step, value = payload
            decision = self.engine.on_report(n, {"loss": value}, step)
            self.decisions.append((n, step, decision.action))
            if decision.stop or decision.pause:
                # The trial hears it, saves its checkpoint and exits.
                self.cancelled.add(n)
                self.push(self.now + 0.1, "exit", n, "told")
        elif kind == "exit" and (n not in self.cancelled or payload in (-15, "told")):
            self.engine.on_exit(n, 0 if payload == "told" else payload, self.now)


def quadratic(params):
    loss = (params["x"] - 1) ** 2 + params["y"]
    return 10.0, [loss + 3, loss + 1, loss], 0


def test_runs_max_trials_with_at_most_parallel_running():
    sim = Simulator(make_engine(make_spec()), quadratic)
    sim.run()
    e = sim.engine
    assert len(e.trials) == 12
    assert e.count(TrialState.SUCCEEDED) == 12
    assert sim.max_running == 3
    assert e.completion.reason == "MaxTrialsReached"
    best = e.study.best_trial
    assert best.value == min(t.value for t in e.trials)


def test_objective_strategy_picks_the_best_reported_value():
    spec = make_spec(objective={"metric": "loss", "goal": "minimize"})
    sim = Simulator(make_engine(spec), lambda p: (5.0, [3.0, 1.0, 2.0], 0))
    sim.run()
    assert {t.value for t in sim.engine.trials} == {1.0}
    spec = make_spec(objective={"metric": "loss", "goal": "minimize", "strategy": "latest"})
    sim = Simulator(make_engine(spec), lambda p: (5.0, [3.0, 1.0, 2.0], 0))
    sim.run()
    assert {t.value for t in sim.engine.trials} == {2.0}


def test_same_seed_same_trials():
    def params_of_run():
        sim = Simulator(make_engine(make_spec()), quadratic)
        sim.run()
        return [t.params for t in sim.engine.trials]

    assert params_of_run() == params_of_run()


def test_failures_are_recorded_with_reason_and_end_the_experiment_past_max_failed():
    spec = make_spec(budget={"maxTrials": 20, "parallelTrials": 2, "maxFailedTrials": 2})
    sim = Simulator(make_engine(spec), lambda p: (3.0, [], 1))
    sim.run()
    e = sim.engine
    failed = [t for t in e.trials if t.state == TrialState.FAILED]
    assert len(failed) == 3
    assert all("exited with code 1" in t.reason for t in failed)
    assert e.completion.reason == "MaxFailedTrialsReached"
    assert not e.completion.succeeded
    assert len(e.trials) < 20


def test_a_trial_that_reports_nothing_fails_with_a_reason():
    spec = make_spec(budget={"maxTrials": 2, "parallelTrials": 1, "maxFailedTrials": 5})
    sim = Simulator(make_engine(spec), lambda p: (1.0, [], 0))
    sim.run()
    assert all(t.state == TrialState.FAILED for t in sim.engine.trials)
    assert "no value for objective metric 'loss' was reported" in sim.engine.trials[0].reason
    # Every trial failed, within maxFailedTrials: the experiment has no result, and fails.
    assert sim.engine.completion.reason == "NoTrialSucceeded" and not sim.engine.completion.succeeded
    assert sim.engine.completion.message == "all 2 trials finished, and no trial succeeded (2 failed)"


def test_a_nan_objective_fails_the_trial():
    spec = make_spec(budget={"maxTrials": 1, "parallelTrials": 1})
    sim = Simulator(make_engine(spec), lambda p: (1.0, [float("nan")], 0))
    sim.run()
    t = sim.engine.trials[0]
    assert t.state == TrialState.FAILED and "is nan" in t.reason


def test_hanging_trials_are_stopped_at_the_trial_timeout():
    spec = make_spec(budget={"maxTrials": 4, "parallelTrials": 2, "maxFailedTrials": 10, "trialTimeout": "30s"})
    hang = lambda p: (1.0, [5.0], None) if p["y"] % 2 else (10.0, [1.0], 0)  # noqa: E731
    sim = Simulator(make_engine(spec), hang)
    sim.run()
    e = sim.engine
    hung = [t for t in e.trials if t.params["y"] % 2]
    assert hung, "the seed should give at least one odd y"
    for t in hung:
        assert t.state == TrialState.FAILED
        assert t.reason == "exceeded trialTimeout (30s)"
        assert 30.0 < t.finished_at - t.started_at <= 32.0
    assert e.completion.reason == "MaxTrialsReached"


def test_target_reached_ends_the_experiment_and_stops_the_rest():
    spec = make_spec(objective={"metric": "loss", "goal": "minimize", "target": 5.0},
                     budget={"maxTrials": 50, "parallelTrials": 3})
    sim = Simulator(make_engine(spec), quadratic)
    sim.run()
    e = sim.engine
    assert e.completion.reason == "GoalReached"
    assert e.study.best_trial.value <= 5.0
    assert len(e.trials) < 50
    assert all(not t.state.active for t in e.trials)


def test_experiment_timeout_kills_running_trials():
    spec = make_spec(budget={"maxTrials": 50, "parallelTrials": 2, "timeout": "35s"})
    sim = Simulator(make_engine(spec), quadratic)
    sim.run()
    e = sim.engine
    assert e.completion.reason == "Timeout"
    killed = [t for t in e.trials if t.state == TrialState.KILLED]
    assert killed and all(t.reason == "experiment ended: Timeout" for t in killed)
    assert e.count(TrialState.SUCCEEDED) == 6  # 10 s trials, 2 at a time, for 35 s


def test_a_grid_that_runs_out_ends_the_experiment():
    spec = make_spec(parameters=[{"name": "x", "type": "categorical", "values": ["a", "b", "c"]}],
                     algorithm={"name": "grid"}, budget={"maxTrials": 10, "parallelTrials": 2})
    sim = Simulator(make_engine(spec), lambda p: (1.0, [1.0], 0))
    sim.run()
    assert [t.params["x"] for t in sim.engine.trials] == ["a", "b", "c"]
    assert sim.engine.completion.reason == "SearchSpaceExhausted"


def test_interrupted_trials_run_again_and_finished_ones_never():
    spec = make_spec(budget={"maxTrials": 8, "parallelTrials": 3})
    first = Simulator(make_engine(spec), quadratic)
    # Run until some trials are done and some are in flight, then interrupt.
    while first.engine.count(TrialState.SUCCEEDED) < 4:
        first.apply(first.engine.step(first.now))
        first.advance()
    first.apply(first.engine.interrupt())
    while first.engine.count(TrialState.RUNNING):
        first.advance()
    assert first.engine.done and first.engine.completion.reason == "Interrupted"
    finished = {t.number for t in first.engine.trials if t.state == TrialState.SUCCEEDED}
    killed = {t.number for t in first.engine.trials if t.state == TrialState.KILLED}
    assert finished and killed

    # Resume from the saved records (as the store would give them back).
    saved = [type(t).from_dict(t.to_dict()) for t in first.engine.trials]
    second = Simulator(make_engine(spec, trials=saved), quadratic)
    second.run()
    e = second.engine
    assert e.completion.reason == "MaxTrialsReached"
    assert len(e.trials) == 8 and e.count(TrialState.SUCCEEDED) == 8
    assert not set(second.launches) & finished
    assert killed <= set(second.launches)
    assert all(e.trials[n].attempt == 2 for n in killed)


def test_a_pbt_trial_run_again_after_an_interruption_starts_a_new_history_with_the_parameters_it_runs():
    """Its reports start over, so the exploits decided on the old ones go too: else the record says
    the new attempt began with the parameters it had before an exploit it no longer shows, and PBT
    and the lineage read the old exploits' report numbers into the new reports."""
    spec = make_spec(budget={"maxTrials": 4, "parallelTrials": 4},
                     early_stopping={"name": "pbt", "settings": {"perturbationInterval": 2, "quantileFraction": 0.25}})
    def curve(params):
        loss = (params["x"] - 1) ** 2 + params["y"]
        return 10.0, [loss + 8 / i for i in range(1, 9)], 0

    first = Simulator(make_engine(spec), curve)
    while not any(e["event"] == "exploit" and e["report"] < len(t.intermediate)  # followed by a report
                  for t in first.engine.trials for e in t.events):
        first.apply(first.engine.step(first.now))
        first.advance()
    first.apply(first.engine.interrupt())
    while first.engine.count(TrialState.RUNNING):
        first.advance()
    exploited = {t.number for t in first.engine.trials if any(e["event"] == "exploit" for e in t.events)}
    assert exploited and all(first.engine.trials[n].state == TrialState.KILLED for n in exploited)

    saved = [type(t).from_dict(t.to_dict()) for t in first.engine.trials]
    starts = {}  # trial -> the parameters it was launched with

    class Recording(Simulator):
        def apply(self, actions):
            starts.update((a.trial.number, dict(a.trial.params)) for a in actions if isinstance(a, Launch))
            super().apply(actions)

    second = Recording(make_engine(spec, trials=saved), curve)
    second.run()
    for t in second.engine.trials:
        assert t.attempt == 2 and t.state == TrialState.SUCCEEDED
        exploits = [e for e in t.events if e["event"] == "exploit"]
        # What its lineage starts with is what the new attempt was launched with.
        assert (exploits[0]["old"] if exploits else t.params) == starts[t.number]
        assert all(t.intermediate[e["report"] - 1][0] == e["step"] for e in exploits)
        assert len({e["report"] for e in exploits}) == len(exploits)


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_best_trial_respects_the_goal(goal):
    spec = make_spec(objective={"metric": "loss", "goal": goal})
    sim = Simulator(make_engine(spec), quadratic)
    sim.run()
    values = [t.value for t in sim.engine.trials]
    assert sim.engine.study.best_value == (min(values) if goal == "minimize" else max(values))


def test_a_trial_that_finishes_as_it_is_interrupted_counts_as_finished():
    spec = make_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    engine = make_engine(spec)
    launched = [a.trial.number for a in engine.step(0.0)]
    for n in launched:
        engine.on_started(n, 0.0)
        engine.on_report(n, {"loss": 1.5}, 1)
    stops = engine.interrupt()
    assert sorted(s.number for s in stops) == launched
    engine.on_exit(0, 0, 1.0)    # had already finished: exit code 0
    engine.on_exit(1, -15, 1.0)  # killed by the interruption
    assert engine.trials[0].state == TrialState.SUCCEEDED and engine.trials[0].value == 1.5
    assert engine.trials[1].state == TrialState.KILLED and engine.trials[1].reason == "interrupted"


def curve(params):
    """Nine reports of a loss that falls toward a level set by x and y."""
    level = (params["x"] - 1) ** 2 + params["y"]
    return 9.0, [level + 4.0 / step for step in range(1, 10)], 0


@pytest.mark.parametrize("mode", ["stopping", "promotion"])
def test_asha_through_the_engine_never_reruns_a_step(mode):
    spec = make_spec(budget={"maxTrials": 18, "parallelTrials": 3}, early_stopping={
        "name": "asha", "settings": {"resource": "step", "min": 1, "max": 9, "reductionFactor": 3, "mode": mode}})
    sim = Simulator(make_engine(spec), curve)
    sim.run()
    e = sim.engine
    assert e.completion.reason == "MaxTrialsReached"
    assert e.count(TrialState.PAUSED) == 0 and not any(t.state.active for t in e.trials)
    assert e.count(TrialState.PRUNED) >= 9 and e.count(TrialState.SUCCEEDED) >= 1
    for t in e.trials:
        steps = [s for s, _ in t.intermediate]
        assert steps == sorted(set(steps)), f"trial {t.number} ran a step twice: {steps}"
        if t.state == TrialState.SUCCEEDED:
            assert steps == list(range(1, 10))
    if mode == "promotion":
        paused = {n for n, _, action in sim.decisions if action == "pause"}
        resumed = [n for n in sim.launches if sim.launches.count(n) > 1]
        assert paused and resumed, "promotion pauses trials at rungs and resumes the best"
        assert set(resumed) <= paused


def test_synchronous_hyperband_resumes_paused_winners_after_the_budget_is_spent():
    spec = make_spec(budget={"maxTrials": 9, "parallelTrials": 3}, early_stopping={
        "name": "sha", "settings": {"resource": "step", "min": 1, "max": 9, "reductionFactor": 3}})
    sim = Simulator(make_engine(spec), curve)
    sim.run()
    e = sim.engine
    assert e.completion.reason == "MaxTrialsReached"
    assert len(e.trials) == 9
    finished = [t for t in e.trials if t.state == TrialState.SUCCEEDED]
    assert len(finished) == 1 and [s for s, _ in finished[0].intermediate] == list(range(1, 10))
    assert e.count(TrialState.PRUNED) == 8


def test_a_trial_survives_its_dict_form_whole():
    # The operator, the suggestion service and the local journal pass trials as dicts: every field must travel.
    from dataclasses import fields

    from kubetune.api.trial import Trial

    t = Trial(3, {"lr": 0.1}, TrialState.PRUNED, 0.5, [[1.0, 0.4], [2.0, 0.5]], {"loss": 1.2}, "pruned at rung 1",
              2, 10.0, 20.0, "exp-0003", [{"event": "exploit", "donor": 1}])
    d = t.to_dict()
    assert set(d) == {f.name for f in fields(Trial)}
    assert Trial.from_dict(d) == t
    d["intermediate"][0][1] = 9.9  # a copy: changing the dict leaves the trial alone
    assert t.intermediate[0][1] == 0.4


@pytest.mark.parametrize("method", ["sha", "asha-promotion"])
def test_every_state_change_reaches_the_driver(method):
    """The driver saves what take_changed() returns: a paused trial the scheduler prunes while picking
    the next trial (synchronous HyperBand's losers) must be among them, or the store keeps it Paused."""
    settings = {"resource": "step", "min": 1, "max": 9, "reductionFactor": 3}
    if method == "asha-promotion":
        early = {"name": "asha", "settings": {**settings, "mode": "promotion"}}
    else:
        early = {"name": "sha", "settings": settings}
    spec = make_spec(budget={"maxTrials": 9, "parallelTrials": 3}, early_stopping=early)
    saved: dict[int, tuple] = {}

    class Saving(Simulator):
        def apply(self, actions):
            super().apply(actions)
            for t in self.engine.take_changed():
                saved[t.number] = (t.state, t.reason)

        def advance(self):
            super().advance()
            for t in self.engine.take_changed():
                saved[t.number] = (t.state, t.reason)

    e = Saving(make_engine(spec), curve).run()
    assert e.count(TrialState.PRUNED) >= 1
    assert {t.number: (t.state, t.reason) for t in e.trials} == saved


def test_trials_all_paused_at_once_with_none_succeeded_yet_are_resumed_not_ended():
    """Every trial of a SHA bracket pauses at its first rung and their exits arrive together: the trial
    budget is spent and nothing has succeeded yet (which alone reads "no trial succeeded"), yet the
    winners must be resumed, not pruned with the experiment ended Failed."""
    spec = make_spec(budget={"maxTrials": 9, "parallelTrials": 9}, early_stopping={
        "name": "sha", "settings": {"resource": "step", "min": 1, "max": 9, "reductionFactor": 3}})
    engine = make_engine(spec)
    launched = [a.trial for a in engine.step(0.0)]
    assert len(launched) == 9
    for t in launched:
        engine.on_started(t.number, 0.0)
        level = curve(t.params)[1][0]
        assert engine.on_report(t.number, {"loss": level}, 1).pause
    for t in launched:  # one batch of exits, then one step
        engine.on_exit(t.number, 0, 1.0)
    assert engine.count(TrialState.PAUSED) == 9
    resumed = [a.trial.number for a in engine.step(1.0)]
    assert engine.completion is None
    best_three = sorted(launched, key=lambda t: curve(t.params)[1][0])[:3]
    assert sorted(resumed) == sorted(t.number for t in best_three)
    assert all(engine.trials[n].budget == 3 for n in resumed)
