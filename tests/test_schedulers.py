"""Schedulers: decisions on crafted curves, rebuild after a restart, settings errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from kubetune import Study
from kubetune.api.trial import Trial, TrialState
from kubetune.api.validation import SpecError
from kubetune.schedulers import SCHEDULERS, check_early_stopping
from kubetune.schedulers.lineage import lineage

PARAMS = [
    {"name": "lr", "type": "double", "min": 1e-4, "max": 1.0, "log": True},
    {"name": "units", "type": "int", "min": 1, "max": 8},
    {"name": "opt", "type": "categorical", "values": ["adam", "sgd", "rms"]},
]
RUNGS = {"resource": "epoch", "min": 1, "max": 9, "reductionFactor": 3}


def study(name, settings=None, goal="maximize", seed=0, trials=()):
    es = {"name": name, "settings": settings} if settings is not None else {"name": name}
    return Study(parameters=PARAMS, goal=goal, seed=seed, early_stopping=es, trials=trials)


def curve(params, step):
    """A deterministic learning curve: rises with lr (to a point) and units."""
    q = math.exp(-((math.log10(params["lr"]) + 1.5) ** 2)) * (0.6 + params["units"] / 20)
    q *= {"adam": 1.0, "sgd": 0.9, "rms": 0.95}[params["opt"]]
    return q * (1 - math.exp(-step / 3))


# -- ASHA ---------------------------------------------------------------------


def test_asha_stops_trials_outside_the_top_third_at_a_rung():
    s = study("asha", RUNGS)
    a, b, c = s.ask(), s.ask(), s.ask()
    assert s.report(a, step=1, value=0.5).action == "continue"  # first at the rung: nothing to compare
    assert s.report(b, step=1, value=0.9).action == "continue"
    d = s.report(c, step=1, value=0.1)
    assert d.stop and "top 1/3" in d.reason and "epoch 1" in d.reason
    assert c.state == TrialState.PRUNED
    s.tell(c, 0.1)
    assert c.state == TrialState.PRUNED  # a stopped trial stays Pruned
    # Between rungs nothing is decided; at max a trial finishes on its own.
    assert s.report(a, step=2, value=0.0).action == "continue"
    assert s.report(b, step=9, value=0.95).action == "continue"


def test_asha_minimize_goal_flips_the_order():
    s = study("asha", RUNGS, goal="minimize")
    a, b = s.ask(), s.ask()
    s.report(a, step=1, value=0.1)
    assert s.report(b, step=1, value=0.9).stop


def test_asha_a_nan_report_does_not_blind_the_rung_to_later_trials():
    # A diverged trial's NaN (or inf) is not a value the Study judges; it must not be ranked at the
    # rung either, in the long-lived scheduler or one rebuilt from the trials after a restart.
    for restart in (False, True):
        s = study("asha", RUNGS, goal="minimize")
        a, b, c, d = s.ask(), s.ask(), s.ask(), s.ask()
        assert s.report(a, step=1, value=float("nan")).action == "continue"
        s.tell(a, None)  # it failed
        if restart:
            s = study("asha", RUNGS, goal="minimize", trials=copy.deepcopy(s.trials))
            b, c, d = s.trials[1:]
        assert s.report(b, step=1, value=0.5).action == "continue"
        assert s.report(c, step=1, value=0.4).action == "continue"
        assert s.report(d, step=1, value=0.45).stop  # only the best of 3 goes on
    # A NaN at the rung's step: the trial's value there is its next finite report.
    s = study("asha", RUNGS, goal="minimize")
    a, b = s.ask(), s.ask()
    s.report(a, step=1, value=0.1)
    assert s.report(b, step=1, value=float("-inf")).action == "continue"
    assert s.report(b, step=2, value=0.9).stop


def test_asha_judges_a_retried_trial_on_its_new_attempt_as_a_rebuilt_scheduler_does():
    # A trial whose pod was lost runs again as attempt 2 with no reports (the suggestion service's
    # record of it is replaced); the values of attempt 1 are gone from the trials a rebuilt scheduler reads.
    for restart in (False, True):
        s = study("asha", RUNGS, goal="minimize")
        a, b, c = s.ask(), s.ask(), s.ask()
        s.report(a, step=1, value=0.1)
        s.report(a, step=2, value=0.1)
        s.trials[0] = a = Trial(number=0, params=dict(a.params), attempt=2)
        if restart:
            s = study("asha", RUNGS, goal="minimize", trials=copy.deepcopy(s.trials))
            a, b, c = s.trials
        assert s.report(a, step=1, value=0.9).action == "continue"  # at rung 0 again, alone there
        assert s.report(b, step=1, value=0.5).action == "continue"  # not judged against attempt 1's 0.1
        assert s.report(c, step=1, value=0.7).stop
        assert s.scheduler.rung(0, 0) == {0: 0.9, 1: 0.5, 2: 0.7}


def test_asha_never_waits_for_a_rung_to_fill():
    for mode in ("stopping", "promotion"):
        s = study("asha", {**RUNGS, "mode": mode})
        for i in range(30):
            t = s.ask()  # a free worker always gets work at once
            assert t is not None and t.state == TrialState.PENDING
            d = s.report(t, step=(t.last_step or 0) + 1, value=curve(t.params, 1))
            assert d.action in ("continue", "stop", "pause")
            if d.action == "continue":
                s.tell(t, curve(t.params, 1))


def test_promotion_asha_resumes_the_top_third_as_soon_as_it_is_known():
    s = study("asha", {**RUNGS, "mode": "promotion"})
    trials = [s.ask() for _ in range(3)]
    assert all(t.budget == 1 for t in trials)
    for t, v in zip(trials, (0.2, 0.8, 0.5)):
        assert s.report(t, step=1, value=v).action == "pause"
        assert t.state == TrialState.PAUSED
    # 3 at rung 0 -> the best one (0.8) goes on to epoch 3, from its checkpoint.
    nxt = s.ask()
    assert nxt is trials[1] and nxt.state == TrialState.PENDING and nxt.budget == 3
    assert nxt.events[-1] == {"event": "resume", "budget": 3, "from_step": 1}
    # No other paused trial is in the top third: the next worker gets a new configuration.
    assert s.ask().number == 3
    # Only resumes are wanted once no new trials may start.
    assert s.ask(new=False) is None
    assert [t.number for t in s.prune_paused()] == [0, 2]


def test_pausing_schedulers_let_a_trial_whose_report_reached_max_finish():
    # A trainer that reports only at the end (or every 9 epochs) reaches max in one report: there is
    # no rung left to resume it to, so pausing it would strand it (and its value) until the end.
    for name, settings in (("asha", {**RUNGS, "mode": "promotion"}), ("sha", RUNGS), ("hyperband", RUNGS)):
        s = study(name, settings)
        t = s.ask()
        assert s.report(t, step=9, value=0.8).action == "continue", name
        s.tell(t, 0.8)
        assert t.state == TrialState.SUCCEEDED and s.best_trial is t


def test_asha_brackets_are_drawn_from_the_seed_and_number():
    s1, s2 = study("asha", {**RUNGS, "brackets": 3}, seed=5), study("asha", {**RUNGS, "brackets": 3}, seed=5)
    b1 = [s1.scheduler.bracket_of(s1.ask()) for _ in range(40)]
    b2 = [s2.scheduler.bracket_of(s2.ask()) for _ in range(40)]
    assert b1 == b2 and set(b1) == {0, 1, 2}


# -- SHA / HyperBand (synchronous) -----------------------------------------------


def test_sha_pauses_until_the_rung_is_complete_then_promotes_and_prunes():
    s = study("sha", RUNGS)  # 9 trials at epoch 1 -> 3 at epoch 3 -> 1 at epoch 9
    first = [s.ask() for _ in range(9)]
    assert {t.budget for t in first} == {1}
    values = [0.1 * i for i in range(9)]
    for t, v in zip(first[:8], values):
        assert s.report(t, step=1, value=v).action == "pause"
    # The rung is not complete: a free worker starts the next bracket instead of waiting.
    other = s.ask()
    assert other.number == 9 and other.events[0]["bracket"] == 1
    s.report(first[8], step=1, value=values[8])
    resumed = s.ask()
    assert resumed is first[8] and resumed.budget == 3
    # The six worst were pruned when the rung completed.
    assert sorted(t.number for t in first if t.state == TrialState.PRUNED) == list(range(6))
    assert s.ask() is first[7] and s.ask() is first[6]


def test_sha_prunes_a_loser_whose_report_jumped_past_several_rungs():
    # A trainer that reports every few epochs can cross rungs 0 and 1 in one report; if it lost at
    # rung 0 it is pruned there with the rest, not left Paused until the experiment ends.
    s = study("sha", RUNGS, goal="minimize")
    first = [s.ask() for _ in range(9)]
    assert s.report(first[0], step=3, value=0.99).action == "pause"
    for i, t in enumerate(first[1:]):
        s.report(t, step=1, value=0.1 * i)
    assert [s.ask().number for _ in range(3)] == [1, 2, 3]
    assert [t.number for t in first if t.state == TrialState.PRUNED] == [0, 4, 5, 6, 7, 8]


def test_sha_gives_a_failed_winners_place_to_the_next_best():
    # The best trial of the rung crashes after reporting there: it cannot be resumed, so the
    # rung's three places go to the next three (Ray's HyperBand removes an errored trial from its bracket).
    s = study("sha", RUNGS)
    first = [s.ask() for _ in range(9)]
    for i, t in enumerate(first):
        s.report(t, step=1, value=0.1 * i)
    s.tell(first[8], None, state=TrialState.FAILED, reason="exited with code 1")
    assert [s.ask().number for _ in range(3)] == [7, 6, 5]
    assert sorted(t.number for t in first if t.state == TrialState.PRUNED) == [0, 1, 2, 3, 4]


def test_hyperband_cycles_brackets_and_judges_short_brackets_when_no_new_trials_come():
    s = study("hyperband", RUNGS)
    sizes = s.scheduler.bracket_sizes(s.scheduler.s_max + 1)
    assert sizes == [9, 5, 3]
    trials = [s.ask() for _ in range(9 + 5 + 3)]
    assert [t.budget for t in trials] == [1] * 9 + [3] * 5 + [9] * 3
    t = s.ask()
    assert t.events[0]["bracket"] == 3 and t.budget == 1  # the cycle starts again
    for u in trials[9:14]:
        assert s.report(u, step=3, value=curve(u.params, 3)).action == "pause"
    best = max(trials[9:14], key=lambda u: curve(u.params, 3))
    assert s.ask() is best and best.budget == 9
    # A bracket that will never fill is judged with what it has.
    s.report(t, step=1, value=0.5)
    assert s.ask(new=False) is t


def test_hyperband_asynchronous_mode_stops_instead_of_pausing():
    s = study("hyperband", {**RUNGS, "mode": "asynchronous"})
    assert not s.scheduler.needs_checkpoints
    decisions = []
    for _ in range(20):
        t = s.ask()
        for e in range(1, 10):
            d = s.report(t, step=e, value=curve(t.params, e))
            decisions.append(d.action)
            if d.stop:
                break
    assert "pause" not in decisions and "stop" in decisions


def test_bohb_is_hyperband_with_observations_for_a_model():
    s = study("bohb", RUNGS)
    for _ in range(9):
        t = s.ask()
        s.report(t, step=1, value=curve(t.params, 1))
    obs = s.scheduler.observations(s.trials)
    assert list(obs) == [1.0] and len(obs[1.0]) == 9
    assert all(isinstance(p, dict) and loss <= 0 for p, loss in obs[1.0])  # losses: maximise -> negated


# -- median -------------------------------------------------------------------


def test_median_stops_a_trial_below_the_median_of_completed_trials():
    s = study("median", {"startupTrials": 3, "warmupSteps": 2})
    for v in (0.5, 0.6, 0.7):
        t = s.ask()
        for step in range(1, 6):
            s.report(t, step=step, value=v * step / 5)
        s.tell(t, v)
    t = s.ask()
    assert s.report(t, step=1, value=0.0).action == "continue"  # warm-up
    assert s.report(t, step=3, value=0.37).action == "continue"  # 0.37 > median 0.36
    assert s.report(t, step=4, value=0.40).stop  # best 0.40 < median 0.48
    # Before startupTrials completed trials nothing is stopped.
    s2 = study("median", {"startupTrials": 5})
    t = s2.ask()
    assert s2.report(t, step=10, value=-1).action == "continue"


def test_median_a_nan_report_does_not_shield_a_trial_or_hide_the_median():
    # Non-finite reports are not values the Study judges: the median rule reads past them.
    s = study("median", {"startupTrials": 3})
    for i, v in enumerate((0.5, 0.6, 0.7)):
        t = s.ask()
        for step in range(1, 6):
            s.report(t, step=step, value=float("nan") if (i == 0 and step == 4) else v * step / 5)
        s.tell(t, v)
    t = s.ask()
    assert s.report(t, step=4, value=0.1).stop  # median 0.48 (trial 0: 0.3 at step 3)
    t = s.ask()
    assert s.report(t, step=1, value=float("nan")).action == "continue"
    assert s.report(t, step=4, value=0.1).stop  # its best is 0.1, not NaN


# -- PBT ----------------------------------------------------------------------


def run_pbt(s, rounds=24, population=6):
    pop = [s.ask() for _ in range(population)]
    step = {t.number: 0 for t in pop}
    acc = {t.number: 0.0 for t in pop}
    log = []
    for _ in range(rounds):
        for t in pop:
            step[t.number] += 1
            acc[t.number] += curve(t.params, 3)
            d = s.report(t, step=step[t.number], value=acc[t.number])
            log.append((t.number, d))
            if d.action == "exploit":  # carries on from the donor's checkpoint
                step[t.number], acc[t.number] = step[d.donor], acc[d.donor]
    for t in pop:
        s.tell(t, acc[t.number])
    return log


def test_pbt_bottom_quantile_exploits_a_top_trial_and_explores():
    s = study("pbt", {"perturbationInterval": 4, "quantileFraction": 0.25})
    log = run_pbt(s)
    exploits = [(n, d) for n, d in log if d.action == "exploit"]
    assert exploits
    for n, d in exploits:
        assert d.donor != n
        p = d.params
        assert 1e-4 <= p["lr"] <= 1 and isinstance(p["units"], int) and 1 <= p["units"] <= 8
        assert p["opt"] in ("adam", "sgd", "rms")
    # Every exploit is in the trial's events, with the old and new parameters.
    events = [e for t in s.trials for e in t.events if e["event"] == "exploit"]
    assert len(events) == len(exploits) and all({"old", "new", "donor", "step"} <= set(e) for e in events)
    assert s.lineage().startswith("trial ")  # the best trial's, by default
    last = exploits[-1]
    text = s.lineage(last[0]).splitlines()
    assert len(text) >= 2 and text[-1].startswith(f"trial {last[0]}: from trial {last[1].donor}'s checkpoint")


def test_pbt_explore_moves_values_to_neighbours_within_bounds():
    s = study("pbt", {"resampleProbability": 0.0})
    sched = s.scheduler
    params = {"lr": 1.0, "units": 1, "opt": "adam"}
    seen_lr, seen_units, seen_opt = set(), set(), set()
    for i in range(50):
        out = sched.explore(params, sched.rng(99, i))
        seen_lr.add(round(out["lr"], 6))
        seen_units.add(out["units"])
        seen_opt.add(out["opt"])
    # At a bound the step that would be clipped away is taken the other way: explore
    # always changes a value whose range allows it.
    assert seen_lr == {0.8}
    assert seen_units == {2}  # ints move by at least one, never below min
    assert seen_opt == {"sgd"}  # neighbours only
    inside = {"lr": 0.1, "units": 4, "opt": "sgd"}
    outs = [sched.explore(inside, sched.rng(98, i)) for i in range(50)]
    assert {round(o["lr"], 6) for o in outs} == {0.08, 0.12}
    assert {o["units"] for o in outs} == {3, 5}
    assert {o["opt"] for o in outs} == {"adam", "rms"}


@pytest.mark.parametrize("counter", ["own", "donor"])
def test_pbt_after_an_exploit_the_new_parameters_train_a_full_interval(counter):
    """The example trainers go on counting their own epochs after taking a donor's
    checkpoint; Ray-style trainers go on from the donor's step. Either way the next
    check comes one interval after the exploit, not one interval after the donor's step."""
    s = study("pbt", {"perturbationInterval": 4, "quantileFraction": 0.5})
    a, b = s.ask(), s.ask()
    for step in range(1, 9):  # the donor runs ahead to step 8
        s.report(a, step=step, value=0.9)
    for step in range(1, 4):
        assert s.report(b, step=step, value=0.1).action == "continue"
    d = s.report(b, step=4, value=0.1)
    assert d.action == "exploit" and d.donor == a.number
    event = b.events[-1]
    assert event["step"] == 4 and event["donor_step"] == 8 and event["donor_params"] == a.params
    start = 4 if counter == "own" else 8
    actions = [s.report(b, step=start + i, value=0.1).action for i in range(1, 5)]
    assert actions == ["continue"] * 3 + ["exploit"]
    # A rebuilt scheduler replays the same checks from the trials' history.
    again = study("pbt", {"perturbationInterval": 4, "quantileFraction": 0.5}, trials=copy.deepcopy(s.trials))
    assert again.scheduler._last_check(again.trials[b.number], len(b.intermediate)) == start + 4


def test_pbt_compares_trials_at_the_same_step_not_their_latest():
    """A trial that started later is not worse for being younger."""
    s = study("pbt", {"perturbationInterval": 4, "quantileFraction": 0.5})
    old, young = s.ask(), s.ask()
    for step in range(1, 13):  # started earlier: 0.4 at step 4, 0.9 by step 12
        s.report(old, step=step, value=0.1 * step if step <= 4 else 0.9)
    for step in range(1, 4):
        s.report(young, step=step, value=0.1)
    # At step 4 the young trial (0.5) beats the old one's 0.4 there, though not its latest 0.9.
    assert s.report(young, step=4, value=0.5).action == "continue"


def test_pbt_prefers_a_donor_at_most_an_interval_ahead():
    s = study("pbt", {"perturbationInterval": 4, "quantileFraction": 0.5})
    far, near, other, young = s.ask(), s.ask(), s.ask(), s.ask()
    for t, upto in ((far, 12), (near, 6), (other, 6)):
        for step in range(1, upto + 1):
            s.report(t, step=step, value={far.number: 0.9, near.number: 0.8, other.number: 0.3}[t.number])
    for step in range(1, 4):
        s.report(young, step=step, value=0.1)
    d = s.report(young, step=4, value=0.1)
    assert d.action == "exploit" and d.donor == near.number  # top two: far (12) and near (6 <= 4 + 4)
    # With only a donor far ahead, it is still taken.
    s2 = study("pbt", {"perturbationInterval": 4, "quantileFraction": 0.5})
    far, young = s2.ask(), s2.ask()
    for step in range(1, 13):
        s2.report(far, step=step, value=0.9)
    for step in range(1, 4):
        s2.report(young, step=step, value=0.1)
    d = s2.report(young, step=4, value=0.1)
    assert d.action == "exploit" and d.donor == far.number


def test_pbt_explore_never_hands_back_the_donors_parameters():
    s = study("pbt", {"resampleProbability": 0.0})
    sched = s.scheduler
    for params in ({"lr": 1.0, "units": 8, "opt": "rms"}, {"lr": 1e-4, "units": 1, "opt": "adam"}):
        for i in range(30):
            out = sched.explore(params, sched.rng(7, i))
            assert all(out[k] != params[k] for k in params)


def run_staggered(s, offsets, steps=16):
    """Members start `offsets` ticks apart (processes started seconds apart) and report one step a
    tick; a member answered `wait` blocks until Study.released() answers it. Returns the log of
    (tick, trial, step, action) for every decision handed out."""
    pop = [s.ask() for _ in offsets]
    step = {t.number: 0 for t in pop}
    acc = {t.number: 0.0 for t in pop}
    blocked, log = set(), []

    def follow(t, d, tick):
        log.append((tick, t.number, step[t.number], d.action))
        if d.action == "exploit":
            step[t.number], acc[t.number] = step[d.donor], acc[d.donor]

    for tick in range(200):
        for t, offset in zip(pop, offsets):
            if tick < offset or t.number in blocked or t.state.finished:
                continue
            if step[t.number] >= steps:
                s.tell(t, acc[t.number])
            else:
                step[t.number] += 1
                acc[t.number] += curve(t.params, 3)
                d = s.report(t, step=step[t.number], value=acc[t.number])
                if d.wait:
                    blocked.add(t.number)
                else:
                    follow(t, d, tick)
            for held, d in s.released():
                blocked.discard(held.number)
                follow(held, d, tick)
        if all(t.state.finished for t in pop):
            break
    return pop, log


def test_pbt_synch_holds_a_check_until_every_live_member_has_reported_that_step():
    settings = {"perturbationInterval": 4, "quantileFraction": 0.25, "synch": True}
    s = study("pbt", settings)
    pop, log = run_staggered(s, offsets=[0, 3, 5, 9, 10, 14])
    assert all(t.state == TrialState.SUCCEEDED for t in pop) and not s.scheduler._held
    checks = [entry for entry in log if entry[2] % 4 == 0]
    # Each check is answered only once the last member got there: at one tick per generation.
    assert {tick for tick, *_ in checks} == {14 + 3, 14 + 7, 14 + 11, 14 + 15}
    exploits = [e for t in s.trials for e in t.events if e["event"] == "exploit"]
    assert exploits
    # Like for like: every donor was at the exploiting trial's step (its checkpoint from that step).
    assert all(e["donor_step"] == e["step"] for e in exploits)
    # The asynchronous default, on the same population, takes donors at other steps.
    a = study("pbt", {k: v for k, v in settings.items() if k != "synch"})
    run_staggered(a, offsets=[0, 3, 5, 9, 10, 14])
    assert any(e["donor_step"] != e["step"] for t in a.trials for e in t.events if e["event"] == "exploit")


def test_pbt_synch_ranks_the_generation_together():
    s = study("pbt", {"perturbationInterval": 2, "quantileFraction": 0.5, "synch": True})
    a, b, c, d = (s.ask() for _ in range(4))
    values = {a.number: 0.9, b.number: 0.1, c.number: 0.8, d.number: 0.2}
    for t in (a, b, c):
        assert s.report(t, step=1, value=values[t.number]).action == "continue"
        w = s.report(t, step=2, value=values[t.number])
        assert w.wait and w.reason.endswith(f"{d.number} to report step 2")
        assert s.released() == []
    assert s.report(d, step=1, value=0.2).action == "continue"
    last = s.report(d, step=2, value=0.2)  # the last one is decided at once, the others released
    got = {t.number: x for t, x in s.released()} | {d.number: last}
    assert sorted(got) == [a.number, b.number, c.number, d.number]
    assert {n for n, x in got.items() if x.action == "exploit"} == {b.number, d.number}
    assert {x.donor for x in got.values() if x.action == "exploit"} <= {a.number, c.number}
    assert b.events[-1]["event"] == "exploit" and b.params == b.events[-1]["new"]  # applied by the Study
    assert s.released() == []  # each decision once


def test_pbt_an_exploit_never_followed_by_a_report_is_not_recorded_as_the_trials_parameters():
    """A trainer at its last step ends after the exploit decided on that report: none of its values
    came from the new parameters, so once its process is gone (`ended`, as the runtimes call it) it
    keeps its old ones, and the lineage shows no exploit."""
    s = study("pbt", {"perturbationInterval": 2, "quantileFraction": 0.5})
    good, last = s.ask(), s.ask()
    for t, v in ((good, 0.9), (last, 0.1)):
        s.report(t, step=1, value=v)
    s.report(good, step=2, value=0.9)
    own = dict(last.params)
    assert s.report(last, step=2, value=0.1).action == "exploit"  # its last report
    assert last.params != own
    assert s.ended(last) and not s.ended(last)  # undone, once
    s.tell(last, 0.1)
    assert last.params == own and [e["event"] for e in last.events] == ["exploit-unused"]
    assert [seg["donor"] for seg in lineage(s.trials, last.number)] == [None]

    # Followed by a report, an exploit is the trial's history.
    t = s.ask()
    s.report(t, step=1, value=0.0)
    d = s.report(t, step=2, value=0.0)
    assert d.action == "exploit"
    s.report(t, step=3, value=0.95)
    assert not s.ended(t)
    s.tell(t, 0.95)
    assert t.params == d.params and t.events[-1]["event"] == "exploit"
    assert [seg["donor"] for seg in lineage(s.trials, t.number)][-1] == d.donor


def test_pbt_synch_a_member_that_ends_or_goes_on_does_not_hold_the_others():
    s = study("pbt", {"perturbationInterval": 2, "quantileFraction": 0.5, "synch": True})
    a, b, c = s.ask(), s.ask(), s.ask()
    for t in (a, b):
        s.report(t, step=1, value=0.5)
        assert s.report(t, step=2, value=0.5 + t.number / 10).wait
    s.report(c, step=1, value=0.1)
    s.tell(c, None, state=TrialState.FAILED)  # it crashed before step 2
    assert sorted(t.number for t, _ in s.released()) == [a.number, b.number]
    # The cluster's service hears that a pod ended before it hears the trial's final state.
    s1 = study("pbt", {"perturbationInterval": 2, "quantileFraction": 0.5, "synch": True})
    a, b = s1.ask(), s1.ask()
    s1.report(a, step=1, value=0.5)
    assert s1.report(a, step=2, value=0.5).wait
    s1.ended(b)
    assert [(t.number, d.action) for t, d in s1.released()] == [(a.number, "continue")]
    # ... nor is an ended trial ranked, or taken as a donor.
    s4 = study("pbt", {"perturbationInterval": 2, "quantileFraction": 0.5, "synch": True})
    a, b, c = s4.ask(), s4.ask(), s4.ask()
    s4.report(b, step=1, value=0.9)
    s4.ended(b)  # the best so far, then its pod died
    s4.report(c, step=1, value=0.1)
    s4.report(c, step=2, value=0.1)
    s4.report(a, step=1, value=0.5)
    d = s4.report(a, step=2, value=0.5)
    held = {t.number: x for t, x in s4.released()}
    assert d.action == "continue" and held[c.number].action == "exploit" and held[c.number].donor == a.number
    # A trial whose runtime gave up waiting reports again: its held decision is dropped, not sent late.
    s2 = study("pbt", {"perturbationInterval": 2, "quantileFraction": 0.5, "synch": True})
    a, b = s2.ask(), s2.ask()
    s2.report(a, step=1, value=0.5)
    assert s2.report(a, step=2, value=0.5).wait
    assert s2.report(a, step=3, value=0.6).action == "continue"
    s2.report(b, step=1, value=0.1)
    s2.report(b, step=2, value=0.1)
    assert s2.released() == [] and not s2.scheduler._held
    # Pending members (started, no report yet) count: the first report at a check waits for them.
    s3 = study("pbt", {"perturbationInterval": 1, "quantileFraction": 0.5, "synch": True})
    a, _ = s3.ask(), s3.ask()
    assert s3.report(a, step=1, value=0.5).wait


def test_pbt_synch_decisions_lost_with_a_restart_are_made_again_identically():
    settings = {"perturbationInterval": 2, "quantileFraction": 0.5, "synch": True}
    values = [0.9, 0.1, 0.8, 0.2]

    def reports(s, members, upto=2):
        return {t.number: [s.report(t, step=k, value=values[t.number]) for k in range(1, upto + 1)][-1]
                for t in members}

    def rebuilt(s):  # a new process: the scheduler from the saved trial list, holding nothing
        return study("pbt", settings, trials=[Trial.from_dict(t.to_dict()) for t in s.trials])

    def ask_again(s, numbers):
        """Each waiting trial sends its report again; held answers come with s.released()."""
        got = {}
        for n in numbers:
            got[n] = s.resent(n)
            got |= {t.number: d for t, d in s.released()}
        return got

    def summary(decisions):
        return {n: (d.action, d.donor, d.params) for n, d in decisions.items()}

    # Without a restart.
    ref = study("pbt", settings)
    pop = [ref.ask() for _ in range(4)]
    reports(ref, pop[:3])
    last = reports(ref, pop[3:])
    expected = summary({t.number: d for t, d in ref.released()} | last)
    assert {n for n, (action, *_) in expected.items() if action == "exploit"} == {1, 3}

    # Restarted while trials 0-2 waited and trial 3 had not reached step 2.
    s = study("pbt", settings)
    pop = [s.ask() for _ in range(4)]
    reports(s, pop[:3])
    s = rebuilt(s)
    assert all(d.wait for d in ask_again(s, [0, 1, 2]).values())  # held again: trial 3 is behind
    last = reports(s, s.trials[3:])
    assert summary({t.number: d for t, d in s.released()} | last) == expected

    # Restarted after the generation was decided and saved, before its answers went out: the recorded
    # exploits are handed out again (none drawn twice), the others are decided as before; no one goes on
    # past step 2 until every member has asked, so no donor moves on before its checkpoint is taken.
    s = rebuilt(s)
    assert s.resent(0).wait and s.resent(2).wait
    got = ask_again(s, [1, 3])
    assert summary(got) == {n: expected[n] for n in range(4)}
    assert [sum(e["event"] == "exploit" for e in t.events) for t in s.trials] == [0, 1, 0, 1]


def test_pb2_synch_uses_the_gp_bandit_on_released_decisions():
    s = study("pb2", {"perturbationInterval": 3, "quantileFraction": 0.25, "minData": 4, "synch": True})
    pop, log = run_staggered(s, offsets=[0, 1, 2, 4, 6, 7], steps=18)
    exploits = [e for t in s.trials for e in t.events if e["event"] == "exploit"]
    assert exploits and all(e["donor_step"] == e["step"] for e in exploits)
    assert not [entry for entry in log if entry[3] == "wait"]


def test_pb2_explores_with_the_gp_bandit_once_it_has_data():
    s = study("pb2", {"perturbationInterval": 3, "quantileFraction": 0.25, "minData": 4})
    log = run_pbt(s, rounds=24, population=6)
    exploits = [d for _, d in log if d.action == "exploit"]
    assert exploits
    by_gp = [d for d in exploits if "GP bandit" in d.reason]
    assert by_gp and len(by_gp) < len(exploits)  # PBT's explore until minData observations
    for d in exploits:
        p = d.params
        assert 1e-4 <= p["lr"] <= 1 and isinstance(p["units"], int) and 1 <= p["units"] <= 8
        assert p["opt"] in ("adam", "sgd", "rms")
    x, y = s.scheduler.observations(s.trials)
    assert x.shape == (len(y), 3) and np.isfinite(y).all()  # step, lr, units


# -- rebuild after a restart ----------------------------------------------------

CONFIGS = [
    ("asha", RUNGS),
    ("asha", {**RUNGS, "mode": "promotion"}),
    ("asha", {**RUNGS, "brackets": 3}),
    ("sha", RUNGS),
    ("hyperband", RUNGS),
    ("hyperband", {**RUNGS, "mode": "asynchronous"}),
    ("bohb", RUNGS),
    ("median", {"startupTrials": 2}),
    ("pbt", {"perturbationInterval": 3}),
    ("pb2", {"perturbationInterval": 3, "minData": 4, "candidates": 64}),
]


def _worker_trial(s, slots, w, max_trials, log):
    """Worker w's trial: the one it runs, or a new one asked for (None when the Study has none)."""
    if slots[w] is None:
        t = s.ask(new=len(s.trials) < max_trials)
        if t is None:
            return None
        slots[w] = t
        log.append(("ask", t.number, t.budget))
    return slots[w]


def drive(s, ticks, workers=3, restart_at=None, factory=None):
    """Round-robin workers, one report per tick; optionally rebuilds the Study mid-way."""
    log, slots, step, acc = [], [None] * workers, {}, {}
    for tick in range(ticks):
        if tick == restart_at:
            s = factory(copy.deepcopy(s.trials))
            slots = [s.trials[t.number] if t is not None else None for t in slots]
        for w in range(workers):
            t = _worker_trial(s, slots, w, 25, log)
            if t is None:
                continue
            step.setdefault(t.number, 0)
            acc.setdefault(t.number, 0.0)
            step[t.number] += 1
            acc[t.number] += curve(t.params, step[t.number]) / 9
            d = s.report(t, step=step[t.number], value=acc[t.number])
            log.append(("report", t.number, step[t.number], d.to_dict()))
            if d.action == "exploit":
                step[t.number], acc[t.number] = step[d.donor], acc[d.donor]
            if d.action in ("stop", "pause") or step[t.number] >= 9:
                if d.action != "pause":
                    s.tell(t, acc[t.number])
                slots[w] = None
    return log, [t.to_dict() for t in s.trials]


@pytest.mark.parametrize("name,settings", CONFIGS, ids=[f"{n}-{s.get('mode', s.get('brackets', ''))}" for n, s in CONFIGS])
def test_rebuilt_scheduler_takes_the_same_decisions(name, settings):
    def factory(trials=()):
        return study(name, settings, seed=11, trials=trials)

    long_lived = drive(factory(), 60)
    for restart in (7, 23, 41):
        assert drive(factory(), 60, restart_at=restart, factory=factory) == long_lived
    actions = {entry[3]["action"] for entry in long_lived[0] if entry[0] == "report"}
    assert actions - {"continue"}, f"{name} took no decision at all"


def test_same_seed_same_decisions_other_seed_other_configurations():
    a = drive(study("asha", RUNGS, seed=3), 40)
    assert a == drive(study("asha", RUNGS, seed=3), 40)
    assert a != drive(study("asha", RUNGS, seed=4), 40)


# -- settings validation --------------------------------------------------------


@pytest.mark.parametrize(
    "name,settings,field,words",
    [
        ("asha", {"min": 1, "reductionFactor": 3}, "early_stopping.settings.max", "required"),
        ("asha", {"max": 27, "reductionFactor": 1}, "early_stopping.settings.reductionFactor", "at least 2"),
        ("asha", {"max": 27, "min": 0}, "early_stopping.settings.min", "greater than 0"),
        ("asha", {"max": 2, "min": 1}, "early_stopping.settings.max", "only one rung"),
        ("asha", {"max": 27, "mode": "pause"}, "early_stopping.settings.mode", "stopping, promotion"),
        ("asha", {"max": 27, "brackets": 9}, "early_stopping.settings.brackets", "at most 4"),
        ("asha", {"max": 27, "reduction": 3}, "early_stopping.settings.reduction", "reductionFactor"),
        ("hyperband", {"max": 27, "mode": "promotion"}, "early_stopping.settings.mode", "synchronous"),
        ("sha", {"max": "27"}, "early_stopping.settings.max", "expected a number"),
        ("median", {"percentile": 100}, "early_stopping.settings.percentile", "between 0 and 100"),
        ("median", {"startupTrials": -1}, "early_stopping.settings.startupTrials", "at least 0"),
        ("pbt", {"quantileFraction": 0.7}, "early_stopping.settings.quantileFraction", "0.5"),
        ("pbt", {"resampleProbability": 2}, "early_stopping.settings.resampleProbability", "between 0 and 1"),
        ("pbt", {"perturbationFactors": []}, "early_stopping.settings.perturbationFactors", "non-empty"),
        ("pbt", {"synch": "yes"}, "early_stopping.settings.synch", "true or false"),
    ],
)
def test_settings_errors_name_the_field(name, settings, field, words):
    with pytest.raises(SpecError) as err:
        study(name, settings)
    paths = [p.path for p in err.value.problems]
    assert paths == [field], err.value
    assert words in str(err.value)


def test_spec_level_checks_see_the_budget():
    spec = {"parameters": PARAMS, "budget": {"parallelTrials": 1}}
    problems = check_early_stopping({"name": "pbt"}, spec, "spec.earlyStopping")
    assert [p.path for p in problems] == ["spec.budget.parallelTrials"]
    problems = check_early_stopping({"name": "ashaa", "settings": {}}, spec, "spec.earlyStopping")
    assert problems[0].path == "spec.earlyStopping.name" and "asha" in problems[0].message


def test_every_scheduler_is_registered():
    assert set(SCHEDULERS) == {"median", "sha", "hyperband", "asha", "bohb", "pbt", "pb2"}


# -- the rung bookkeeping's fast path against the straightforward rule -----------------


def _reference_ingest(self, trial, upto):
    """RungScheduler._ingest as first written: every entry walks the milestones."""
    b = self.bracket_of(trial)
    ms = self.milestones(b)
    recs = self._recs.setdefault(b, [{} for _ in ms])
    done, k = self._seen.get(trial.number, (0, 0))
    crossed = []
    for step, value in trial.intermediate[done:upto]:
        while k < len(ms) and step >= ms[k] * (1 - 1e-9) and math.isfinite(value):
            recs[k][trial.number] = self.loss(value)
            crossed.append(k)
            k += 1
    self._seen[trial.number] = (max(done, upto), k)
    return crossed


def random_drive(s, seed, ticks=70, workers=4):
    """Round-robin workers with irregular steps (jumps over rungs, repeats, a step back, fractions,
    a NaN now and then); the log of every answer, the trials, and the scheduler's rung records."""
    rng = np.random.default_rng(seed)
    log, slots, step = [], [None] * workers, {}
    for _ in range(ticks):
        for w in range(workers):
            t = _worker_trial(s, slots, w, 30, log)
            if t is None:
                continue
            step.setdefault(t.number, 0.0)
            step[t.number] += float(rng.choice([0, 0.5, 1, 1, 1, 2, 3, 7, -1]))
            value = float("nan") if rng.random() < 0.03 else float(rng.random())
            d = s.report(t, step=step[t.number], value=value)
            log.append(("report", t.number, step[t.number], d.to_dict()))
            if d.action in ("stop", "pause") or step[t.number] >= 9 or rng.random() < 0.05:
                if d.action != "pause":
                    s.tell(t, value)
                slots[w] = None
    sched = getattr(s.scheduler, "_async", None) or s.scheduler
    return log, [t.to_dict() for t in s.trials], sched._recs, sched._seen


@pytest.mark.parametrize("name,settings", CONFIGS[:7], ids=[f"{n}-{s.get('mode', s.get('brackets', ''))}"
                                                            for n, s in CONFIGS[:7]])
def test_rung_fast_path_decides_as_the_reference_rule(name, settings, monkeypatch):
    from kubetune.schedulers.rungs import RungScheduler

    for seed in range(4):
        fast = random_drive(study(name, settings, seed=seed), seed)
        with monkeypatch.context() as m:
            m.setattr(RungScheduler, "_ingest", _reference_ingest)
            reference = random_drive(study(name, settings, seed=seed), seed)
        assert repr(fast) == repr(reference)  # repr: NaN values compare unequal
        assert any(e[0] == "report" and e[3].get("action", "continue") != "continue" for e in fast[0])
