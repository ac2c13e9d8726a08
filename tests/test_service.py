"""The suggestion service's requests, in process: the whole trial list, or only what changed since."""

from __future__ import annotations

from kubetune.api.trial import Trial, TrialState
from kubetune.service.server import SuggestionService

EXPERIMENT = {"namespace": "team", "name": "tune", "uid": "uid-1"}
DOCUMENT = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "tune", "namespace": "team", "uid": "uid-1"},
            "spec": {"objective": {"metric": "loss", "goal": "minimize"},
                     "parameters": [{"name": "x", "type": "double", "min": -5, "max": 5},
                                    {"name": "k", "type": "categorical", "values": ["a", "b", "c"]}],
                     "algorithm": {"name": "tpe", "settings": {"startupTrials": 3}},
                     "budget": {"maxTrials": 40, "parallelTrials": 4},
                     "trialTemplate": {"command": ["true"]}}}


def full(trials: list[Trial], count: int) -> dict:
    return {"experiment": EXPERIMENT, "document": DOCUMENT, "seed": 7, "prior": [],
            "trials": [t.to_dict() for t in trials], "count": count}


def delta(epoch: str, changed: list[Trial], total: int, count: int) -> dict:
    return {"experiment": EXPERIMENT, "epoch": epoch, "changed": [t.to_dict() for t in changed],
            "total": total, "count": count}


def finish(suggestions: list[dict]) -> list[Trial]:
    return [Trial(s["number"], s["params"], TrialState.SUCCEEDED, (s["params"]["x"] - 1.0) ** 2)
            for s in suggestions]


def test_sending_only_changed_trials_suggests_what_the_whole_list_would():
    by_delta, by_list = SuggestionService(), SuggestionService()
    trials: list[Trial] = []
    answer = by_delta.suggest(full(trials, 2))
    assert by_list.suggest(full(trials, 2))["suggestions"] == answer["suggestions"]
    epoch = answer["epoch"]
    for _ in range(8):
        done = finish(answer["suggestions"])
        trials += done
        answer = by_delta.suggest(delta(epoch, done, len(trials), 2))
        assert "resync" not in answer and answer["epoch"] == epoch
        assert answer["suggestions"] == by_list.suggest(full(trials, 2))["suggestions"]
    assert [s["number"] for s in answer["suggestions"]] == [len(trials), len(trials) + 1]


def test_a_service_that_lost_the_epoch_asks_for_the_whole_list():
    service = SuggestionService()
    epoch = service.suggest(full([], 1))["epoch"]
    restarted = SuggestionService()
    assert restarted.suggest(delta(epoch, [], 1, 1)) == {"resync": True}
    assert service.suggest(delta("some-other-epoch", [], 1, 1)) == {"resync": True}


def test_a_gap_in_the_changes_asks_for_the_whole_list():
    service = SuggestionService()
    answer = service.suggest(full([], 1))
    far = Trial(5, {"x": 0.0, "k": "a"}, TrialState.SUCCEEDED, 1.0)
    assert service.suggest(delta(answer["epoch"], [far], 6, 1)) == {"resync": True}


def test_trials_asked_for_but_not_created_are_asked_for_again_identically():
    service = SuggestionService()
    first = service.suggest(full([], 3))
    # Only the first suggestion became a Trial resource; the others are asked for again.
    created = [Trial(0, first["suggestions"][0]["params"])]
    again = service.suggest(delta(first["epoch"], created, 1, 2))
    assert again["suggestions"] == first["suggestions"][1:]


def test_a_trial_whose_pod_ended_no_longer_holds_a_synchronous_pbt_population():
    """The operator's flush at a pod's end ("ended") releases the members waiting for it."""
    import copy
    import threading
    import time

    from kubetune.bus import MemoryBus, TrialClient

    doc = copy.deepcopy(DOCUMENT)
    doc["spec"]["algorithm"] = {"name": "random"}
    doc["spec"]["budget"] = {"maxTrials": 2, "parallelTrials": 2}
    doc["spec"]["earlyStopping"] = {"name": "pbt", "settings": {"perturbationInterval": 1, "synch": True}}
    bus = MemoryBus()
    service = SuggestionService(bus=bus)
    try:
        service.suggest({**full([], 2), "document": doc})
        brain = service.brains.get("team/tune")
        got = []
        member = threading.Thread(target=lambda: got.append(
            TrialClient(bus, "team/tune/uid-1", 0, wait=True, wait_s=0.2).send_report(1, {"loss": 0.5})))
        member.start()
        deadline = time.monotonic() + 10
        while not brain.study.scheduler._held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert brain.study.scheduler._held, "trial 0's check waits for trial 1"
        time.sleep(0.3)  # past the client's wait_s: only the hold keeps it waiting
        assert member.is_alive()
        service.flush({"experiment": EXPERIMENT, "trial": 1, "ended": True})  # trial 1's pod failed
        member.join(10)
        assert not member.is_alive() and got[0].action == "continue"
    finally:
        service.close()


def test_a_retried_trial_starts_afresh_without_the_lost_attempts_reports_or_decisions():
    """The operator's flush with `attempt` (the pod was lost, a new one starts the trial again): the
    new attempt's reports are not appended to the lost one's, and an answer the lost pod never
    took (here a PBT exploit) is not handed to the new one (its client drops what it finds queued)."""
    import copy
    import time

    from kubetune.bus import MemoryBus, Report, TrialClient

    doc = copy.deepcopy(DOCUMENT)
    doc["spec"]["algorithm"] = {"name": "random"}
    doc["spec"]["budget"] = {"maxTrials": 2, "parallelTrials": 2}
    doc["spec"]["earlyStopping"] = {"name": "pbt", "settings": {"perturbationInterval": 1, "quantileFraction": 0.5}}
    bus = MemoryBus()
    service = SuggestionService(bus=bus)
    try:
        service.suggest({**full([], 2), "document": doc})
        study = service.brains.get("team/tune").study
        assert TrialClient(bus, "team/tune/uid-1", 0, wait=True).send_report(1, {"loss": 0.1}).action == "continue"
        bus.publish("team/tune/uid-1", [Report(1, 1, 1.0, {"loss": 0.9})])  # the pod about to be lost: never reads
        deadline = time.monotonic() + 10
        while not study.trials[1].events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert study.trials[1].events[-1]["event"] == "exploit", "the bottom half exploits the top"

        service.flush({"experiment": EXPERIMENT, "trial": 1, "attempt": 2})
        again = TrialClient(bus, "team/tune/uid-1", 1, attempt=2, wait=True)
        assert again.send_report(1, {"loss": 0.05}).action == "continue"  # its own answer, not the exploit
        t = study.trials[1]
        assert t.attempt == 2 and t.intermediate == [[1.0, 0.05]] and t.events == []
    finally:
        service.close()


def test_forgetting_a_deleted_experiment_keeps_the_one_created_again_under_its_name():
    """The finalizer of the deleted experiment may run after the new one (same name, new uid) started:
    it removes the old one's bus keys only, and the new one's Study and reports stay."""
    import copy

    from kubetune.bus import MemoryBus, Report

    bus = MemoryBus()
    service = SuggestionService(bus=bus)
    try:
        service.suggest({**full([], 1), "document": DOCUMENT})
        again = copy.deepcopy(DOCUMENT)
        again["metadata"]["uid"] = "uid-2"
        service.suggest({**full([], 1), "experiment": {**EXPERIMENT, "uid": "uid-2"}, "document": again})
        brain = service.brains.get("team/tune")
        assert brain.uid == "uid-2" and brain.bus_key == "team/tune/uid-2"
        bus.publish("team/tune/uid-1", [Report(0, 1, 1.0, {"loss": 0.5})])  # an old pod, still terminating
        bus.publish("team/tune/uid-2", [Report(0, 1, 1.0, {"loss": 0.4})])
        service.forget({"experiment": EXPERIMENT})  # uid-1's finalizer
        assert service.brains.get("team/tune") is brain
        assert bus.experiments() == {"team/tune/uid-2"}
        service._loops["team/tune"][2].catch_up()
        assert brain.study.trials[0].intermediate == [[1.0, 0.4]]
        service.forget({"experiment": {**EXPERIMENT, "uid": "uid-2"}})
        assert service.brains.get("team/tune") is None and bus.experiments() == set()
    finally:
        service.close()


def _promotion_asha_service():
    import copy

    doc = copy.deepcopy(DOCUMENT)
    doc["spec"]["algorithm"] = {"name": "random"}
    doc["spec"]["budget"] = {"maxTrials": 9, "parallelTrials": 3}
    doc["spec"]["earlyStopping"] = {"name": "asha", "settings": {"resource": "epoch", "min": 1, "max": 9,
                                                                 "reductionFactor": 3, "mode": "promotion"}}
    service = SuggestionService()
    first = service.suggest({**full([], 3), "document": doc})["suggestions"]
    return service, doc, service.brains.get("team/tune").study, first


def as_api_holds(t: Trial, state: TrialState) -> Trial:
    """The trial's record as the operator reads it from the API, in `state`."""
    record = Trial.from_dict(t.to_dict())
    record.state = state
    return record


def test_a_paused_trial_is_resumed_only_once_the_api_shows_its_pod_ended():
    """Paused by the scheduler, a trial's pod still saves its checkpoint and exits: promoting it then
    would start its next pod beside the one still writing that checkpoint."""
    service, doc, study, first = _promotion_asha_service()
    assert all(s["assignment"] == {"bracket": 0, "budget": 1.0} for s in first)  # the first run's budget
    for s in first:
        assert study.report(s["number"], step=1, value=(s["params"]["x"] - 1.0) ** 2).pause
    best = min(first, key=lambda s: (s["params"]["x"] - 1.0) ** 2)["number"]
    pods_ended = [as_api_holds(t, TrialState.RUNNING if t.number == best else TrialState.PAUSED) for t in study.trials]
    answer = service.suggest({**full(pods_ended, 1), "document": doc, "new": 0})
    assert answer["suggestions"] == [], "the best is promoted, but its pod is still running"
    assert study.trials[best].state == TrialState.PAUSED, "its later reports are answered `pause`"
    pods_ended[best].state = TrialState.PAUSED
    answer = service.suggest({**full(pods_ended, 1), "document": doc, "new": 0})
    [resumed] = answer["suggestions"]
    assert resumed["number"] == best and resumed["resume"] is True
    assert resumed["events"][-1] == {"event": "resume", "budget": 3.0, "from_step": 1.0}
    assert study.trials[best].state == TrialState.PENDING and study.trials[best].budget == 3.0


def test_a_resume_that_a_service_before_a_restart_made_is_taken_from_the_api():
    """A service restarted after it resumed a trial (and the operator carried it out) rebuilds it as
    the API holds it: Pending with its resume recorded, its reports applied, not answered `pause`."""
    service, doc, study, first = _promotion_asha_service()
    for s in first:
        study.report(s["number"], step=1, value=(s["params"]["x"] - 1.0) ** 2)
    paused = [as_api_holds(t, TrialState.PAUSED) for t in study.trials]
    [resumed] = service.suggest({**full(paused, 1), "document": doc, "new": 0})["suggestions"]
    api = [as_api_holds(t, TrialState.PAUSED) for t in study.trials]
    api[resumed["number"]].state, api[resumed["number"]].events = TrialState.PENDING, resumed["events"]

    restarted = SuggestionService()
    restarted.suggest({**full([as_api_holds(t, TrialState.PAUSED) for t in paused], 0), "document": doc})
    rebuilt = restarted.brains.get("team/tune").study
    assert rebuilt.trials[resumed["number"]].state == TrialState.PAUSED
    restarted.suggest({**full(api, 0), "document": doc})  # the API now holds the old service's resume
    t = rebuilt.trials[resumed["number"]]
    assert t.state == TrialState.PENDING and t.budget == 3.0
    assert not rebuilt.report(t, step=2, value=0.5).pause


def test_a_trial_resumed_but_not_yet_seen_so_by_the_operator_holds_its_slot():
    """The operator asks again before its watch cache shows the trial it just resumed: seeing it Paused,
    it counts its slot as free. Answered another resume (or a new trial), it ran one more pod than
    parallelTrials allows."""
    service, doc, study, first = _promotion_asha_service()
    second = service.suggest({**full(study.trials, 3), "document": doc})["suggestions"]
    for s in first + second:  # six at rung 0: the top two may go on
        assert study.report(s["number"], step=1, value=(s["params"]["x"] - 1.0) ** 2).pause
    paused = [as_api_holds(t, TrialState.PAUSED) for t in study.trials]
    answer = service.suggest({**full(paused, 1), "document": doc, "new": 0})
    [resumed] = answer["suggestions"]
    assert resumed["resume"] is True
    # The operator's next request: its cache still shows every trial Paused, so one slot seems free.
    again = service.suggest({**delta(answer["epoch"], [], len(paused), 1), "document": doc, "new": 0})
    assert again["suggestions"] == [], "the slot is the resumed trial's"
    # Once the operator shows it Pending, the slot is its (the operator counts it) and is not asked for.
    api = [as_api_holds(t, TrialState.PENDING if t.number == resumed["number"] else TrialState.PAUSED)
           for t in study.trials]
    later = service.suggest({**delta(answer["epoch"], [api[resumed["number"]]], len(api), 1), "new": 0})
    [other] = later["suggestions"]
    assert other["resume"] is True and other["number"] != resumed["number"]
