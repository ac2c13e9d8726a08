"""The operator's Controller against the real test cluster's API server, without the kopf process: for
interleavings that the whole operator hits only by chance, forced here (the API server is real)."""

from __future__ import annotations

import threading

import pytest

from kubernetes import config as kube_config

from kubetune.api.spec import ExperimentSpec
from kubetune.operator.control import Controller
from kubetune.operator.kube import Kube
from kubetune.operator.records import trial_resource
from tests.test_operator import curve_spec, experiment, get, with_sidecar


class _Interleaved(Kube):
    """Each thread's first read of an experiment waits for the other thread's: both read the same status."""

    def __init__(self, api_client, parties: int):
        super().__init__(api_client)
        self.barrier, self.seen = threading.Barrier(parties, timeout=20), threading.local()

    def get_experiment(self, namespace, name):
        exp = super().get_experiment(namespace, name)
        if not getattr(self.seen, "once", False):
            self.seen.once = True
            self.barrier.wait()
        return exp


def test_trials_lost_together_count_one_retry_each(k8s_cluster, k8s_namespace, chart):
    """A node with several trials is lost: their pods' events are handled at once, in threads. Each retry
    must count against maxFailedTrials: two read-modify-writes of status.retries from the same read
    counted two retries as one, so a flapping node could retry trials without end."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "flap", k8s_namespace, **curve_spec(budget={"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 5})))
    kube = _Interleaved(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)), parties=2)
    exp = get(k8s_cluster, "experiment", k8s_namespace, "flap")
    for n in range(2):
        kube.create_trial(trial_resource(exp, n, {"x": 0.5}))
    controller = Controller(kube, "http://127.0.0.1:9")  # no service: a retry goes on without telling it
    errors = []

    def lose(n):
        try:
            controller._retry(kube.get_trial(k8s_namespace, f"flap-{n:04d}"), "its node was lost")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=lose, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    assert [t["spec"]["attempt"] for t in trials] == [2, 2]
    assert get(k8s_cluster, "experiment", k8s_namespace, "flap")["status"].get("retries") == 2


def test_a_retried_trial_never_ends_with_the_lost_attempts_reports(k8s_cluster, k8s_namespace, chart):
    """The retry's word to the suggestion service fails (a blip: the service keeps running), and the new pod
    ends before it reports anything. The flush at its end must not hand back the lost attempt's reports:
    they made the trial Succeeded with a value its attempt never reported."""
    import socket

    from kubetune.bus import MemoryBus, TrialClient
    from kubetune.service.server import SuggestionService, serve

    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "blip", k8s_namespace, **curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})))
    bus = MemoryBus()
    service = SuggestionService(bus=bus)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(service, "127.0.0.1", port)
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, f"http://127.0.0.1:{port}")
        controller.reconcile_experiment(k8s_namespace, "blip")  # starts it: trial 0, held by the service
        uid = get(k8s_cluster, "experiment", k8s_namespace, "blip")["metadata"]["uid"]
        lost = TrialClient(bus, f"{k8s_namespace}/blip/{uid}", 0, wait=True)
        for step in (1, 2, 3):
            assert lost.send_report(step, {"score": 0.9}).action == "continue"

        controller.suggestion_url = "http://127.0.0.1:9"  # the retry's flush fails
        controller._retry(kube.get_trial(k8s_namespace, "blip-0000"), "its node was lost")
        controller.suggestion_url = f"http://127.0.0.1:{port}"
        kube.delete_pod(k8s_namespace, "blip-0000-r2", grace=0)  # (no kubelet here: its pod is gone)
        controller._finish_trial(kube.get_trial(k8s_namespace, "blip-0000"), 0, "")  # exited, reporting nothing

        trial = kube.get_trial(k8s_namespace, "blip-0000")
        assert trial["spec"]["attempt"] == 2
        assert trial["status"]["state"] == "Failed" and "value" not in trial["status"], trial["status"]
        assert trial["status"]["intermediate"] == []
    finally:
        server.shutdown()
        service.close()


def test_a_pod_made_for_a_trial_killed_meanwhile_does_not_run_on(k8s_cluster, k8s_namespace, chart):
    """The experiment ends (goal reached, timeout) just as a new trial's pod is being made: the pass that
    ends it finds no pod and records the trial Killed, then the pod is created. Nothing would ever stop
    that pod (events of a finished trial's pod are ignored): it held its GPU until it ran to its end."""
    from kubetune.api.trial import TrialState

    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "late", k8s_namespace, **curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})))
    exp = get(k8s_cluster, "experiment", k8s_namespace, "late")

    class EndingMeanwhile(Kube):
        def create_pod(self, body):
            controller.request_stop(k8s_namespace, "late-0000", TrialState.KILLED, "experiment ended: timeout")
            return super().create_pod(body)

    kube = EndingMeanwhile(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    controller = Controller(kube, "http://127.0.0.1:9")
    kube.create_trial(trial_resource(exp, 0, {"x": 0.5}))
    controller.ensure_pod(kube.get_trial(k8s_namespace, "late-0000"))
    assert kube.get_trial(k8s_namespace, "late-0000")["status"]["state"] == "Killed"
    pod = kube.get_pod(k8s_namespace, "late-0000")
    assert pod is None or pod.metadata.deletion_timestamp is not None, "the killed trial's pod runs on"


def test_a_retried_trials_new_pod_running_is_recorded_though_the_watch_cache_lags(k8s_cluster, k8s_namespace, chart):
    """The new attempt's pod reports Running before the operator's watch cache has the trial's retry: the
    cached copy names the lost pod. Its Running was ignored as an earlier attempt's pod's, and the trial
    stayed Pending for its whole run (no startTime: trialTimeout never applied to it)."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "lag", k8s_namespace, **curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})))
    exp = get(k8s_cluster, "experiment", k8s_namespace, "lag")
    kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    controller = Controller(kube, "http://127.0.0.1:9")
    kube.create_trial(trial_resource(exp, 0, {"x": 0.5}))
    kube.patch_trial_status(k8s_namespace, "lag-0000", {"state": "Running", "podName": "lag-0000"})
    cached = kube.get_trial(k8s_namespace, "lag-0000")  # what the watch cache still holds
    controller._retry(kube.get_trial(k8s_namespace, "lag-0000"), "its node was lost")
    pod = kube.core.api_client.sanitize_for_serialization(kube.get_pod(k8s_namespace, "lag-0000-r2"))
    pod["status"] = {"phase": "Running"}
    assert controller.on_pod(pod, cached=cached) == "lag"
    status = kube.get_trial(k8s_namespace, "lag-0000")["status"]
    assert status["state"] == "Running" and status.get("startTime") and status["podName"] == "lag-0000-r2"


def _service():
    import socket

    from kubetune.service.server import SuggestionService, serve

    service = SuggestionService()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return service, serve(service, "127.0.0.1", port), f"http://127.0.0.1:{port}"


PROMOTION_ASHA = {"name": "asha", "settings": {"resource": "epoch", "min": 1, "max": 9, "reductionFactor": 3,
                                               "mode": "promotion"}}


def test_a_resume_whose_answer_was_lost_is_made_again(k8s_cluster, k8s_namespace, chart):
    """The service resumes a paused trial, and its answer is lost (a timeout, a dropped connection): the
    API still shows the trial Paused, unchanged, so it was never sent again, and the service held it as
    resumed for good. It never ran again (a synchronous rung waited on it until the budget ran out)."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("lost", k8s_namespace, **curve_spec(
        budget={"maxTrials": 3, "parallelTrials": 3}, earlyStopping=PROMOTION_ASHA)))
    service, server, url = _service()

    class LosingAResume(Controller):
        lose = True

        def ask_service(self, path, body):
            answer = super().ask_service(path, body)
            if self.lose and any(s.get("resume") for s in answer.get("suggestions", ())):
                self.lose = False
                raise TimeoutError("timed out")  # the service acted on it all the same
            return answer

    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = LosingAResume(kube, url)
        controller.reconcile_experiment(k8s_namespace, "lost")  # its three trials
        study = service.brains.get(f"{k8s_namespace}/lost").study
        trials = sorted(study.trials, key=lambda t: t.params["x"])
        last, best = trials[0], trials[-1]
        for t in trials:  # each paused at rung 0 (the best is promoted once all three are in)
            if t is not last:
                assert study.report(t.number, step=1, value=t.params["x"]).pause
                kube.patch_trial_status(k8s_namespace, t.name, {
                    "state": "Paused", "intermediate": [[1, t.params["x"]]]})
            else:
                kube.patch_trial_status(k8s_namespace, t.name, {"state": "Running", "podName": t.name})
        controller.reconcile_experiment(k8s_namespace, "lost")  # sends both paused: none is promoted yet
        assert kube.get_trial(k8s_namespace, best.name)["status"]["state"] == "Paused"

        assert study.report(last.number, step=1, value=last.params["x"]).pause
        kube.patch_trial_status(k8s_namespace, last.name, {"state": "Paused", "intermediate": [[1, last.params["x"]]]})
        with pytest.raises(OSError):
            controller.reconcile_experiment(k8s_namespace, "lost")  # the best resumed: the answer lost
        controller.reconcile_experiment(k8s_namespace, "lost")
        status = kube.get_trial(k8s_namespace, best.name)["status"]
        assert status["state"] == "Pending" and status["podName"].startswith(f"{best.name}-resume"), status
    finally:
        server.shutdown()
        service.close()


def _three_trials_paused(k8s_cluster, k8s_namespace, name, service, url):
    """A promotion-ASHA experiment of three trials, each paused at rung 0 in the service and in the API;
    the Kube, a Controller on the service, the service's Study and the trials as the API lists them now
    (what a watch cache holds for a while after they change again)."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(name, k8s_namespace, **curve_spec(
        budget={"maxTrials": 3, "parallelTrials": 3}, earlyStopping=PROMOTION_ASHA)))
    kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    controller = Controller(kube, url)
    controller.reconcile_experiment(k8s_namespace, name)  # its three trials
    study = service.brains.get(f"{k8s_namespace}/{name}").study
    for t in study.trials:
        assert study.report(t.number, step=1, value=t.params["x"]).pause
        kube.patch_trial_status(k8s_namespace, t.name, {"state": "Paused", "intermediate": [[1, t.params["x"]]]})
    return kube, controller, study, kube.list_trials(k8s_namespace, name)


def test_a_watch_cache_that_lags_a_resume_never_resumes_the_trial_twice(k8s_cluster, k8s_namespace, chart):
    """A paused trial is resumed (its pod made), then the service is sent the whole list again (a request
    failed meanwhile) from a watch cache that still shows the trial Paused: the service resumed it again,
    and the operator renamed its pod: a second pod ran the same trial beside the first."""
    service, server, url = _service()
    try:
        kube, controller, study, stale = _three_trials_paused(k8s_cluster, k8s_namespace, "twice", service, url)
        controller.reconcile_experiment(k8s_namespace, "twice", stale)  # the best is resumed
        best = max(study.trials, key=lambda t: t.params["x"])
        first = kube.get_trial(k8s_namespace, best.name)["status"]
        assert first["state"] == "Pending" and first["podName"] == f"{best.name}-resume1", first

        controller.suggestion_url = "http://127.0.0.1:9"  # a request fails: the next sends the whole list
        with pytest.raises(OSError):
            controller.reconcile_experiment(k8s_namespace, "twice", stale)
        controller.suggestion_url = url
        controller.reconcile_experiment(k8s_namespace, "twice", stale)  # the cache still lags the resume
        assert kube.get_trial(k8s_namespace, best.name)["status"]["podName"] == f"{best.name}-resume1"
    finally:
        server.shutdown()
        service.close()


def test_a_watch_cache_that_lags_a_resume_never_ends_the_resumed_trial(k8s_cluster, k8s_namespace, chart):
    """The budget is spent and the last promotion is made: the trial is resumed. The next pass, from a watch
    cache that still shows it Paused, found every trial paused and none to resume, recorded them all Pruned
    and ended the experiment, while the resumed trial's pod ran on (a finished trial's pod is never stopped)."""
    service, server, url = _service()
    try:
        kube, controller, study, stale = _three_trials_paused(k8s_cluster, k8s_namespace, "ended", service, url)
        assert not controller.reconcile_experiment(k8s_namespace, "ended", stale)  # the best is resumed
        best = max(study.trials, key=lambda t: t.params["x"])
        assert kube.get_trial(k8s_namespace, best.name)["status"]["state"] == "Pending"

        assert not controller.reconcile_experiment(k8s_namespace, "ended", stale)  # the cache still lags it
        assert kube.get_trial(k8s_namespace, best.name)["status"]["state"] == "Pending"
        assert not get(k8s_cluster, "experiment", k8s_namespace, "ended")["status"].get("completionTime")
    finally:
        server.shutdown()
        service.close()


def test_a_trial_just_created_is_not_dropped_for_a_resume_while_the_watch_cache_lacks_it(
        k8s_cluster, k8s_namespace, chart):
    """A pass runs before the watch cache has the trial the last one created: its slot looks free, and the
    service, sent a list without it, drops it to ask for it again, identically. With a paused trial to
    resume, the resume took that slot instead: the new trial was gone from the service (its pod's reports
    answered `stop`: no such trial), and the resumed one's pod ran beyond parallelTrials."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("drop", k8s_namespace, **curve_spec(
        budget={"maxTrials": 4, "parallelTrials": 2}, earlyStopping=PROMOTION_ASHA)))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, url)
        controller.reconcile_experiment(k8s_namespace, "drop")  # trials 0 and 1
        study = service.brains.get(f"{k8s_namespace}/drop").study

        def pause(number, value):
            assert study.report(number, step=1, value=value).pause
            kube.patch_trial_status(k8s_namespace, f"drop-{number:04d}", {"state": "Paused", "intermediate": [[1, value]]})

        kube.patch_trial_status(k8s_namespace, "drop-0001", {"state": "Running", "podName": "drop-0001"})
        pause(0, 0.9)  # the best of rung 0, once three are in
        controller.reconcile_experiment(k8s_namespace, "drop")  # trial 2
        pause(2, 0.5)
        controller.reconcile_experiment(k8s_namespace, "drop")  # trial 3, the last
        assert len(kube.list_trials(k8s_namespace, "drop")) == 4
        assert study.report(1, step=1, value=0.1).pause  # the third at rung 0; its pod still saving
        cache = [t for t in kube.list_trials(k8s_namespace, "drop") if t["spec"]["number"] != 3]  # lags trial 3
        controller.reconcile_experiment(k8s_namespace, "drop", cache)
        assert len(study.trials) == 4, "the trial just created was dropped from the service"
        assert kube.get_trial(k8s_namespace, "drop-0000")["status"]["state"] == "Paused", "a third pod for two slots"
    finally:
        server.shutdown()
        service.close()


def test_the_schedulers_stop_never_overwrites_the_operators(k8s_cluster, k8s_namespace, chart):
    """trialTimeout marks a trial Failed while the service pauses it at a rung: the service's write of its
    pause replaced the operator's stop, so the timed-out trial ended Paused and was resumed later."""
    from kubetune.service.__main__ import _write_with_stop

    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("late", k8s_namespace, **curve_spec(
        budget={"maxTrials": 2, "parallelTrials": 2})))
    kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    exp = get(k8s_cluster, "experiment", k8s_namespace, "late")
    for n in range(2):
        kube.create_trial(trial_resource(exp, n, {"x": 0.5}))
        kube.patch_trial_status(k8s_namespace, f"late-{n:04d}", {"state": "Running"})
    timed_out = {"state": "Failed", "reason": "exceeded trialTimeout (3s)"}
    kube.patch_trial_status(k8s_namespace, "late-0000", {"stop": timed_out})
    paused = {"intermediate": [[1, 0.5]], "stop": {"state": "Paused", "reason": "paused at step 1"}}
    for n in range(2):
        _write_with_stop(kube, k8s_namespace, f"late-{n:04d}", paused)
    first, second = (kube.get_trial(k8s_namespace, f"late-{n:04d}")["status"] for n in range(2))
    assert first["stop"] == timed_out and first["intermediate"] == [[1, 0.5]]  # the values all the same
    assert second["stop"] == paused["stop"]


def test_an_experiment_never_ends_without_the_trials_it_created_moments_ago(k8s_cluster, k8s_namespace, chart):
    """The experiment times out in the pass after the one that created trials, and the watch cache does
    not show them yet: it ended without them, so nothing stopped them and their pods ran to the end."""
    import time

    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("brief", k8s_namespace, **curve_spec(
        budget={"maxTrials": 4, "parallelTrials": 2, "timeout": "1h"})))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, url)
        assert not controller.reconcile_experiment(k8s_namespace, "brief")  # creates two trials
        controller.clock = lambda: time.time() + 7200  # the timeout has passed
        assert not controller.reconcile_experiment(k8s_namespace, "brief", [])  # a cache without them
        assert not get(k8s_cluster, "experiment", k8s_namespace, "brief")["status"].get("completionTime")
        over = [controller.reconcile_experiment(k8s_namespace, "brief") for _ in range(2)]  # from the API
        assert over == [False, True], "the first pass stops the two trials, the second ends the experiment"
        trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
        assert [t["status"]["state"] for t in trials] == ["Killed", "Killed"]
        assert get(k8s_cluster, "experiment", k8s_namespace, "brief")["status"]["phase"] == "Failed"
    finally:
        server.shutdown()
        service.close()


def test_warm_start_takes_the_named_experiments_own_finished_trials(k8s_cluster, k8s_namespace, chart):
    """The prior sent to the service: the succeeded trials of the experiment named in warmStart, not those
    of one deleted earlier under its name that the garbage collector has not removed yet."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("first", k8s_namespace, **curve_spec()))
    kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    first = get(k8s_cluster, "experiment", k8s_namespace, "first")
    for n, (x, state) in enumerate([(0.1, "Succeeded"), (0.2, "Failed"), (0.3, "Succeeded")]):
        kube.create_trial(trial_resource(first, n, {"x": x}))
        kube.patch_trial_status(k8s_namespace, f"first-{n:04d}", {"state": state, "value": x})
    # Left by an earlier "first", not collected yet. (Made without its owner, which the garbage collector
    # would see is gone and remove at once: only the uid in its ownerReferences tells it from the others.)
    gone = trial_resource(first, 3, {"x": 0.9})
    del gone["metadata"]["ownerReferences"]
    kube.create_trial(gone)
    kube.patch_trial_status(k8s_namespace, "first-0003", {"state": "Succeeded", "value": 0.9})

    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "second", k8s_namespace, **curve_spec(warmStart={"fromExperiments": ["first"]})))
    second = get(k8s_cluster, "experiment", k8s_namespace, "second")
    controller = Controller(kube, "http://127.0.0.1:9")
    prior = controller._prior(second, ExperimentSpec.from_document(second))
    assert sorted((t.params["x"], t.value) for t in prior) == [(0.1, 0.1), (0.3, 0.3)]


def test_the_newest_trial_deleted_by_hand_is_not_created_again_by_a_restarted_operator(
        k8s_cluster, k8s_namespace, chart):
    """Nothing in the list of trials shows that the newest one existed once it is deleted: the experiment's
    status keeps how many were created, or a restarted operator would make that number again, and the new
    trial would share the deleted one's metric stream and checkpoints."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("newest", k8s_namespace, **curve_spec(
        budget={"maxTrials": 4, "parallelTrials": 2})))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        assert not Controller(kube, url).reconcile_experiment(k8s_namespace, "newest")  # trials 0 and 1
        k8s_cluster.kubectl("delete", "trial", "newest-0001", "-n", k8s_namespace, "--wait=true")
        assert not Controller(kube, url).reconcile_experiment(k8s_namespace, "newest")  # restarted: trial 2
        names = sorted(t["metadata"]["name"] for t in get(k8s_cluster, "trials", k8s_namespace)["items"])
        assert names == ["newest-0000", "newest-0002"]
        controller = Controller(kube, url)
        assert not controller.reconcile_experiment(k8s_namespace, "newest")  # (counts what the last one made)
        status = get(k8s_cluster, "experiment", k8s_namespace, "newest")["status"]
        assert (status["created"], status["trials"], status["killed"]) == (3, 3, 1)
    finally:
        server.shutdown()
        service.close()


def test_warm_start_from_an_experiment_with_another_metric_takes_the_values_it_recorded_of_this_one(
        k8s_cluster, k8s_namespace, chart):
    """An earlier experiment that minimised loss and recorded score beside it: its trials enter the prior with
    their score, never their loss; those that did not report score are left out."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "lossy", k8s_namespace, **curve_spec(objective={"metric": "loss", "goal": "minimize"})))
    kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    lossy = get(k8s_cluster, "experiment", k8s_namespace, "lossy")
    for n, (x, metrics) in enumerate([(0.1, {"score": 0.9}), (0.2, {}), (0.3, {"score": 0.7, "step": 3})]):
        kube.create_trial(trial_resource(lossy, n, {"x": x}))
        kube.patch_trial_status(k8s_namespace, f"lossy-{n:04d}", {"state": "Succeeded", "value": x,
                                                                   "metrics": metrics})
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "warm", k8s_namespace, **curve_spec(warmStart={"fromExperiments": ["lossy"]})))
    warm = get(k8s_cluster, "experiment", k8s_namespace, "warm")
    controller = Controller(kube, "http://127.0.0.1:9")
    spec = ExperimentSpec.from_document(warm)
    assert controller._missing_warm_start(warm, spec) == ""
    prior = controller._prior(warm, spec)
    assert sorted((t.params["x"], t.value) for t in prior) == [(0.1, 0.9), (0.3, 0.7)]


def test_a_trial_is_judged_by_its_own_containers_status_and_a_pod_left_with_sidecars_is_deleted(
        k8s_cluster, k8s_namespace, chart):
    """A pod's containerStatuses in any order (a webhook may inject a proxy first): the trial ends when its own
    container does, with its exit code, never a sidecar's. And a pod left running with sidecars after its trial's
    end was recorded (the operator gone between the two) is deleted when its next event comes."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "mesh", k8s_namespace, **with_sidecar(curve_spec(budget={"maxTrials": 3, "parallelTrials": 3}))))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, url)
        controller.reconcile_experiment(k8s_namespace, "mesh")  # its three trials
        pods = {}
        for n in range(3):
            controller.ensure_pod(kube.get_trial(k8s_namespace, f"mesh-{n:04d}"))
            pods[n] = kube.core.api_client.sanitize_for_serialization(kube.get_pod(k8s_namespace, f"mesh-{n:04d}"))

        def seen(pod, phase, **states):
            return {**pod, "status": {"phase": phase, "containerStatuses": [
                {"name": name, "state": {"terminated": {"exitCode": state, "reason": "Error" if state else "Completed"}}
                 if isinstance(state, int) else {"running": {}}} for name, state in states.items()]}}

        controller.on_pod(seen(pods[0], "Running", shipper=7, trial="running"))  # (a sidecar failed early)
        assert kube.get_trial(k8s_namespace, "mesh-0000")["status"]["state"] == "Running"
        assert controller.on_pod(seen(pods[0], "Failed", shipper=7, trial=0)) == "mesh"  # (it reported nothing)
        status = kube.get_trial(k8s_namespace, "mesh-0000")["status"]
        assert status["reason"] == "no value for objective metric 'score' was reported", status
        assert kube.get_pod(k8s_namespace, "mesh-0000") is not None  # (over: kept for its logs)

        assert controller.on_pod(seen(pods[2], "Running", trial=3, shipper="running")) == "mesh"
        status = kube.get_trial(k8s_namespace, "mesh-0002")["status"]
        assert status["state"] == "Failed" and status["reason"].startswith("exited with code 3"), status
        assert kube.get_pod(k8s_namespace, "mesh-0002") is None  # (unscheduled here: deleted at once)

        kube.patch_trial_status(k8s_namespace, "mesh-0001", {"state": "Succeeded", "value": 0.5})  # then a crash
        assert controller.on_pod(seen(pods[1], "Running", trial=0, shipper="running")) is None
        assert kube.get_pod(k8s_namespace, "mesh-0001") is None
        assert kube.get_trial(k8s_namespace, "mesh-0001")["status"]["value"] == 0.5
        # (`kubectl logs` shows the trial's container, and the operator names it so, whatever comes first)
        assert pods[0]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "trial"
    finally:
        server.shutdown()
        service.close()



def test_an_experiment_deleted_and_applied_again_starts_afresh_under_the_same_operator(
        k8s_cluster, k8s_namespace, chart):
    """`kubectl delete -f exp.yaml; kubectl apply -f exp.yaml` while it runs: kopf stops the old one's daemon
    without a last pass, so the operator still held what it knew of it. The new one's first pass, seeing none
    of the trials the old one created moments ago, wrote their count as status.created; the next took each
    of those numbers for a Trial deleted by hand: the new experiment started with the old one's trials as
    Killed ("the Trial was deleted"), and, its maxTrials spent on them, failed NoTrialSucceeded at once."""
    spec = curve_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("again", k8s_namespace, **spec))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, url)  # one operator throughout
        assert not controller.reconcile_experiment(k8s_namespace, "again")  # trials 0 and 1
        k8s_cluster.kubectl("delete", "experiment", "again", "-n", k8s_namespace, "--wait=true")
        k8s_cluster.kubectl("delete", "trials", "--all", "-n", k8s_namespace, "--wait=true")  # (as the GC does)
        k8s_cluster.kubectl("apply", "-f", "-", input=experiment("again", k8s_namespace, **spec))
        over = [controller.reconcile_experiment(k8s_namespace, "again") for _ in range(3)]
        exp = get(k8s_cluster, "experiment", k8s_namespace, "again")
        status = exp["status"]
        assert over == [False] * 3 and "completionTime" not in status, status.get("conditions")
        assert not status.get("killed") and status.get("created") == 2, status
        trials = [t for t in get(k8s_cluster, "trials", k8s_namespace)["items"]
                  if t["metadata"]["ownerReferences"][0]["uid"] == exp["metadata"]["uid"]]
        assert sorted(t["metadata"]["name"] for t in trials) == ["again-0000", "again-0001"]
    finally:
        server.shutdown()
        service.close()


def test_a_running_experiment_that_set_the_ca_itself_goes_on_when_the_operator_mounts_one(
        k8s_cluster, k8s_namespace, chart):
    """Before --redis-ca-secret, the README had users set KUBETUNE_REDIS_CA_FILE in trialTemplate.env. The
    operator restarted with the flag judged running experiments' templates again on every pass: each one
    that had followed that advice ended Failed InvalidSpec mid-run, and its running trials were never
    stopped (their pods ran on, holding their GPUs, for an experiment that was over)."""
    spec = curve_spec(budget={"maxTrials": 2, "parallelTrials": 1})
    spec["trialTemplate"]["env"] = [{"name": "KUBETUNE_REDIS_CA_FILE", "value": "/etc/in-house-ca/ca.crt"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("ownca", k8s_namespace, **spec))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        bus = {"url": "rediss://redis.internal:6380/0"}
        assert not Controller(kube, url, bus).reconcile_experiment(k8s_namespace, "ownca")  # trial 0 runs
        restarted = Controller(kube, url, {**bus, "caSecret": {"name": "redis-ca", "key": "ca.crt"}})
        assert not restarted.reconcile_experiment(k8s_namespace, "ownca")
        status = get(k8s_cluster, "experiment", k8s_namespace, "ownca")["status"]
        assert "completionTime" not in status, status.get("conditions")
        # Its pods get the operator's CA, and one variable naming it.
        from kubetune.operator.pods import trial_pod
        exp = get(k8s_cluster, "experiment", k8s_namespace, "ownca")
        pod = trial_pod(ExperimentSpec.from_document(exp), kube.get_trial(k8s_namespace, "ownca-0000"), restarted.bus)
        cas = [e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "KUBETUNE_REDIS_CA_FILE"]
        assert cas == ["/var/run/kubetune/redis-ca/ca.crt"]
    finally:
        server.shutdown()
        service.close()


def test_an_oom_killed_trials_reason_says_so_not_its_last_log_line(k8s_cluster, k8s_namespace, chart):
    """Trial containers get terminationMessagePolicy FallbackToLogsOnError: the kubelet fills the message of
    any failed exit with the log's end, an OOM kill's too. The reason read the last line the trainer printed
    before the kernel killed it (a progress bar, say), where it said `OOMKilled` before that policy: the one
    word that tells a user to give the trial more memory."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "oom", k8s_namespace, **curve_spec(budget={"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 2})))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, url)
        controller.reconcile_experiment(k8s_namespace, "oom")  # its two trials
        for n, (code, reason, message) in enumerate([
                (137, "OOMKilled", "epoch 3:  45%|####5     | 450/1000\n"),  # as the kubelet writes it
                (1, "Error", "Traceback (most recent call last):\nValueError: the data set is empty\n")]):
            name = f"oom-{n:04d}"
            controller.ensure_pod(kube.get_trial(k8s_namespace, name))
            pod = kube.core.api_client.sanitize_for_serialization(kube.get_pod(k8s_namespace, name))
            pod["status"] = {"phase": "Failed", "containerStatuses": [{"name": "trial", "state": {"terminated": {
                "exitCode": code, "reason": reason, "message": message}}}]}
            assert controller.on_pod(pod) == "oom"
        reasons = [kube.get_trial(k8s_namespace, f"oom-{n:04d}")["status"]["reason"] for n in range(2)]
        assert reasons == ["exited with code 137: OOMKilled",
                           "exited with code 1: ValueError: the data set is empty"]
    finally:
        server.shutdown()
        service.close()


def test_an_experiment_ended_by_an_operator_before_this_one_is_not_continued_for_trials_deleted_since(
        k8s_cluster, k8s_namespace, chart):
    """Experiments that an earlier operator ended have no status.observedGeneration (nor status.created): the
    upgraded operator judged each on first sight as if its spec had been edited. One whose trials had been
    cleaned up since (kubectl delete trials, to spare etcd) read as under its maxTrials, and went on: it ran
    its whole budget again, on GPUs, months after it ended."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "old", k8s_namespace, **curve_spec(budget={"maxTrials": 2, "parallelTrials": 2})))
    kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
    ended = {"seed": 7, "phase": "Succeeded", "startTime": "2026-01-01T00:00:00Z",
             "completionTime": "2026-01-01T01:00:00Z", "trials": 2, "succeeded": 2, "conditions": [
                 {"type": "Running", "status": "False", "reason": "MaxTrialsReached", "message": "all 2 trials finished"},
                 {"type": "Succeeded", "status": "True", "reason": "MaxTrialsReached",
                  "message": "all 2 trials finished"}]}
    kube.patch_experiment_status(k8s_namespace, "old", ended)  # as the earlier operator left it; its trials gone
    controller = Controller(kube, "http://127.0.0.1:9")
    assert not controller.continue_if_raised(k8s_namespace, "old")
    exp = get(k8s_cluster, "experiment", k8s_namespace, "old")
    assert exp["status"]["completionTime"] == ended["completionTime"], exp["status"]
    assert exp["status"]["observedGeneration"] == exp["metadata"]["generation"]  # (an edit from now on is judged)


def test_an_edit_that_makes_a_running_experiment_invalid_ends_its_trials_with_it(k8s_cluster, k8s_namespace, chart):
    """The experiment ended InvalidSpec, and its running trials ran on to the end, holding their GPUs, for
    results nothing would use."""
    import json as json_

    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("edited", k8s_namespace, **curve_spec(
        budget={"maxTrials": 4, "parallelTrials": 2})))
    service, server, url = _service()
    try:
        kube = Kube(kube_config.new_client_from_config(str(k8s_cluster.kubeconfig)))
        controller = Controller(kube, url)
        assert not controller.reconcile_experiment(k8s_namespace, "edited")  # trials 0 and 1
        kube.patch_trial_status(k8s_namespace, "edited-0001", {"state": "Running", "podName": "edited-0001"})
        k8s_cluster.kubectl("patch", "experiment", "edited", "-n", k8s_namespace, "--type", "merge", "-p",
                            json_.dumps({"spec": {"algorithm": {"settings": {"sead": 1}}}}))
        assert controller.reconcile_experiment(k8s_namespace, "edited")
        status = get(k8s_cluster, "experiment", k8s_namespace, "edited")["status"]
        assert (status["phase"], status["conditions"][-1]["reason"]) == ("Failed", "InvalidSpec")
        trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
        assert [(t["status"]["state"], t["status"]["reason"]) for t in trials] == [
            ("Killed", "experiment ended: InvalidSpec")] * 2
    finally:
        server.shutdown()
        service.close()
