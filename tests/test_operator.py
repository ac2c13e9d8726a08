"""The operator and the suggestion service on the real test cluster.

Everything is real but the kubelet: kube-apiserver, etcd and the controller
manager (tests/cluster), Redis (tests/redis_server.py), the operator and the
suggestion service as their own processes, and trial pods run by the test
kubelet as local processes that report through the Redis bus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.operator.records import parse_time
from tests.chart import OPERATOR_SA, SUGGESTION_SA
from tests.cluster.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ROOT / "tests" / "trials"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The operator and the suggestion service as processes that tests may kill and restart."""

    def __init__(self, cluster, redis, workdir: Path, kubeconfigs: dict[str, Path],
                 env: dict[str, dict[str, str]] | None = None):
        """env: more environment for "operator" or "suggestion" (as the chart sets it)."""
        self.cluster, self.redis, self.workdir = cluster, redis, workdir
        self.port = free_port()
        self.kubeconfigs = kubeconfigs
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, which: str) -> None:
        if which == "suggestion":
            argv = [sys.executable, "-m", "kubetune.service", "--host", "127.0.0.1", "--port", str(self.port),
                    "--redis-url", self.redis.url]
        else:
            argv = [sys.executable, "-m", "kubetune.operator", "--suggestion-url", f"http://127.0.0.1:{self.port}",
                    "--redis-url", self.redis.url]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfigs[which]), "PYTHONUNBUFFERED": "1",
               **self.env.get(which, {})}
        log = open(self.workdir / f"{which}.log", "a")
        self.procs[which] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        if which == "suggestion":
            import urllib.request

            def ready():
                try:
                    return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status == 200
                except OSError:
                    return False
            wait_until(ready, timeout=20, what="suggestion service ready")

    def kill(self, which: str) -> None:
        proc = self.procs.pop(which)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for which in list(self.procs):
            proc = self.procs.pop(which)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.workdir.glob("*.log"))


@pytest.fixture
def crds(chart):
    return chart


@pytest.fixture
def stack(k8s_cluster, chart, redis_server, tmp_path):
    """The operator and the suggestion service, each with its ServiceAccount from the chart."""
    s = Stack(k8s_cluster, redis_server, tmp_path,
              {"operator": chart(OPERATOR_SA), "suggestion": chart(SUGGESTION_SA)})
    s.start("suggestion")
    s.start("operator")
    try:
        yield s
    finally:
        s.stop()


def experiment(name, namespace, **spec):
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return yaml.safe_dump(doc)


def get(cluster, kind, namespace, name=None):
    args = ["get", kind, "-n", namespace, "-o", "json"] + ([name] if name else [])
    return json.loads(cluster.kubectl(*args).stdout)


def wait_phase(cluster, namespace, name, stack, timeout=120):
    def over():
        status = get(cluster, "experiment", namespace, name).get("status") or {}
        return status.get("completionTime") is not None
    try:
        wait_until(over, timeout=timeout, interval=0.2, what=f"experiment {name} to finish")
    except Exception:
        print(stack.logs())
        raise
    return get(cluster, "experiment", namespace, name)["status"]


def trial_states(cluster, namespace) -> str:
    """What each trial came to, for an assertion message."""
    return "\n".join(f"{t['metadata']['name']}: {(t.get('status') or {}).get('state')} "
                     f"{(t.get('status') or {}).get('reason', '')}" for t in get(cluster, "trials", namespace)["items"])


def curve_spec(**over):
    spec = {
        "objective": {"metric": "score", "goal": "maximize"},
        "parameters": [{"name": "x", "type": "double", "min": 0.0, "max": 1.0}],
        "algorithm": {"name": "random", "settings": {"seed": 3}},
        "budget": {"maxTrials": 6, "parallelTrials": 2},
        "trialTemplate": {"image": "kubetune/trial:test", "command": ["python", str(TRIALS / "curve.py")],
                          "resources": {"limits": {"nvidia.com/gpu": 1}}},
    }
    spec.update(over)
    return spec


def test_an_experiment_runs_its_trials_as_pods_and_succeeds(k8s_cluster, k8s_namespace, make_kubelet, stack):
    make_kubelet(gpus=2)
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("plain", k8s_namespace, **curve_spec()))
    status = wait_phase(k8s_cluster, k8s_namespace, "plain", stack)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    assert status["succeeded"] == 6 and status["trials"] == 6, (trial_states(k8s_cluster, k8s_namespace), stack.logs())
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    values = [t["status"]["value"] for t in trials]
    assert status["bestObjective"] == max(values)
    assert status["bestTrial"]["name"] in {t["metadata"]["name"] for t in trials}
    # Every trial's value is its best reported score, reported through Redis.
    for t in trials:
        x = t["spec"]["params"]["x"]
        assert t["status"]["value"] == pytest.approx((1 - (x - 0.3) ** 2) * (1 - 0.5 ** 9))
        assert len(t["status"]["intermediate"]) == 9
    table = k8s_cluster.kubectl("get", "experiments", "-n", k8s_namespace).stdout
    assert table.split()[:10] == ["NAME", "ALGORITHM", "STATUS", "RUNNING", "PAUSED", "SUCCEEDED", "PRUNED", "FAILED", "BEST",
                                  "AGE"]
    assert "plain" in table and "random" in table and "Succeeded" in table


@pytest.fixture
def tls_stack(k8s_cluster, k8s_namespace, chart, redis_server_factory, tmp_path):
    """An external Redis serving TLS only, its certificate signed by a CA no system trusts: the CA is a Secret
    in the experiment's namespace, the operator is told its name as the chart tells it
    (KUBETUNE_REDIS_CA_SECRET), the suggestion service reads the CA file as the chart mounts it."""
    redis = redis_server_factory(tls=True)
    assert redis.url.startswith("rediss://")
    k8s_cluster.kubectl("create", "secret", "generic", "in-house-ca", "-n", k8s_namespace,
                        f"--from-file=ca.crt={redis.ca_file}")
    s = Stack(k8s_cluster, redis, tmp_path, {"operator": chart(OPERATOR_SA), "suggestion": chart(SUGGESTION_SA)},
              env={"operator": {"KUBETUNE_REDIS_CA_SECRET": "in-house-ca"},
                   "suggestion": {"KUBETUNE_REDIS_CA_FILE": str(redis.ca_file)}})
    s.start("suggestion")
    s.start("operator")
    try:
        yield s
    finally:
        s.stop()


def test_trials_report_over_tls_to_a_redis_whose_private_ca_is_a_secret(k8s_cluster, k8s_namespace, make_kubelet,
                                                                          tls_stack):
    """Each trial pod gets the CA Secret as a volume and KUBETUNE_REDIS_CA_FILE, and its SDK reports over the bus."""
    make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 4, "parallelTrials": 2})
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("tls", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "tls", tls_stack)
    states = trial_states(k8s_cluster, k8s_namespace)
    assert status["phase"] == "Succeeded" and status["succeeded"] == 4, (states, tls_stack.logs())
    for t in get(k8s_cluster, "trials", k8s_namespace)["items"]:  # every report came over the bus
        x = t["spec"]["params"]["x"]
        assert [step for step, _ in t["status"]["intermediate"]] == list(range(1, 10)), states
        assert t["status"]["value"] == pytest.approx((1 - (x - 0.3) ** 2) * (1 - 0.5 ** 9))
    for pod in get(k8s_cluster, "pods", k8s_namespace)["items"]:  # the CA reached them through the Secret only
        [container] = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["KUBETUNE_REDIS_URL"] == tls_stack.redis.url
        assert env["KUBETUNE_REDIS_CA_FILE"] == "/var/run/kubetune/redis-ca/ca.crt"
        [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == "kubetune-redis-ca"]
        assert volume["secret"]["secretName"] == "in-house-ca"


def test_a_template_using_the_names_reserved_for_the_redis_ca_fails_naming_the_field(k8s_cluster, k8s_namespace,
                                                                                      tls_stack):
    spec = curve_spec()
    spec["trialTemplate"]["podSpec"] = {"containers": [{"name": "trial"}],
                                        "volumes": [{"name": "kubetune-redis-ca", "emptyDir": {}}]}
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("clash", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "clash", tls_stack, timeout=30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.trialTemplate.podSpec.volumes[0].name: 'kubetune-redis-ca' is reserved")
    assert get(k8s_cluster, "trials", k8s_namespace)["items"] == []


def test_the_api_server_refuses_an_invalid_experiment_naming_the_field(k8s_cluster, k8s_namespace, crds):
    bad = curve_spec(parameters=[{"name": "x", "type": "double", "min": 5, "max": 1}])
    result = k8s_cluster.kubectl("apply", "-f", "-", input=experiment("bad", k8s_namespace, **bad), check=False)
    assert result.returncode != 0
    assert "spec.parameters[0].max" in result.stderr and "max must be greater than min" in result.stderr
    typo = curve_spec(budget={"maxTrails": 3})
    result = k8s_cluster.kubectl("apply", "-f", "-", input=experiment("typo", k8s_namespace, **typo), check=False)
    assert result.returncode != 0 and 'unknown field "spec.budget.maxTrails"' in result.stderr


def test_a_spec_only_the_operator_can_judge_fails_with_the_field_named(k8s_cluster, k8s_namespace, stack):
    spec = curve_spec(algorithm={"name": "random", "settings": {"sead": 1}})
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("settings", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "settings", stack, timeout=30)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.algorithm.settings.sead: unknown setting (did you mean 'seed'?)" in failed["message"]
    assert get(k8s_cluster, "trials", k8s_namespace)["items"] == []


def test_a_warm_start_from_an_experiment_that_does_not_exist_fails_naming_the_field(k8s_cluster, k8s_namespace,
                                                                                      stack):
    """As `kubetune run` does: a misspelt name in warmStart is a mistake, not a cold start."""
    spec = curve_spec(warmStart={"fromExperiments": ["nope"]})
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("warm", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "warm", stack, timeout=30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert failed["message"] == f"spec.warmStart.fromExperiments[0]: no experiment 'nope' in namespace {k8s_namespace}"
    assert get(k8s_cluster, "trials", k8s_namespace)["items"] == []


def test_a_warm_start_from_an_experiment_with_another_objective_fails_naming_the_field(k8s_cluster, k8s_namespace,
                                                                                         stack):
    """As `kubetune run` does: the earlier experiment's values, minimised losses, would be taken as scores to
    maximise (the prior upside down); it must have optimised the same metric the same way."""
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "old", k8s_namespace, **curve_spec(objective={"metric": "score", "goal": "minimize"})))
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "lossy", k8s_namespace, **curve_spec(objective={"metric": "loss", "goal": "minimize"})))
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment(
        "warm", k8s_namespace, **curve_spec(warmStart={"fromExperiments": ["old", "lossy"]})))
    status = wait_phase(k8s_cluster, k8s_namespace, "warm", stack, timeout=30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(
        "spec.warmStart.fromExperiments[0]: experiment 'old' minimizes score; this one maximizes score")
    assert ("; spec.warmStart.fromExperiments[1]: experiment 'lossy' minimizes loss; this one maximizes score, "
            "and none of its succeeded trials reported 'score'") in failed["message"]
    assert [t["spec"]["experiment"] for t in get(k8s_cluster, "trials", k8s_namespace)["items"]
            if t["spec"]["experiment"] == "warm"] == []


def edit(cluster, namespace, name, spec: dict) -> None:
    cluster.kubectl("patch", "experiment", name, "-n", namespace, "--type", "merge", "-p", json.dumps({"spec": spec}))


def judged(cluster, namespace, name, stack) -> dict:
    """The status once the operator has judged the experiment's latest edit (it stays ended, or goes on)."""
    def seen():
        exp = get(cluster, "experiment", namespace, name)
        status = exp.get("status") or {}
        return not status.get("completionTime") or status.get("observedGeneration") == exp["metadata"]["generation"]
    try:
        wait_until(seen, timeout=30, interval=0.2, what=f"the edit of {name} judged")
    except Exception:
        print(stack.logs())
        raise
    return get(cluster, "experiment", namespace, name)["status"]


def ended_by(status: dict) -> str:
    return next(c["reason"] for c in status["conditions"] if c["type"] == status["phase"])


def test_raising_the_timeout_continues_an_experiment_that_timed_out(k8s_cluster, k8s_namespace, make_kubelet, stack,
                                                                     tmp_path):
    """As `kubetune run` of the edited spec does: budget.timeout bounds the time the experiment ran, as maxTrials
    its trials; raised past it, an experiment that ended with Timeout goes on for what is left. The time it
    spent ended does not count: here, since it started, more than the new timeout has passed."""
    make_kubelet(gpus=2)
    gate = tmp_path / "go"
    spec = curve_spec(budget={"maxTrials": 3, "parallelTrials": 1, "timeout": "10s"})
    spec["trialTemplate"]["env"] = [{"name": "HOLD_FROM", "value": "1"}, {"name": "HOLD_FILE", "value": str(gate)}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("clock", k8s_namespace, **spec))
    first = wait_phase(k8s_cluster, k8s_namespace, "clock", stack, timeout=60)
    assert (first["phase"], ended_by(first)) == ("Succeeded", "Timeout"), trial_states(k8s_cluster, k8s_namespace)
    assert (first["succeeded"], first["killed"]) == (1, 1)

    edit(k8s_cluster, k8s_namespace, "clock", {"budget": {"maxTrials": 4}})  # out of time all the same
    still = judged(k8s_cluster, k8s_namespace, "clock", stack)
    assert still["completionTime"] == first["completionTime"] and ended_by(still) == "Timeout"
    started = get(k8s_cluster, "experiment", k8s_namespace, "clock")["metadata"]["creationTimestamp"]
    while time.time() < parse_time(started) + 27:
        time.sleep(0.5)
    gate.touch()
    edit(k8s_cluster, k8s_namespace, "clock", {"budget": {"timeout": "25s", "parallelTrials": 2}})
    wait_until(lambda: not get(k8s_cluster, "experiment", k8s_namespace, "clock")["status"].get("completionTime")
               or get(k8s_cluster, "experiment", k8s_namespace, "clock")["status"].get("continuedTime"),
               timeout=30, interval=0.2, what="the experiment to go on")
    last = wait_phase(k8s_cluster, k8s_namespace, "clock", stack, timeout=60)
    assert (last["phase"], ended_by(last)) == ("Succeeded", "MaxTrialsReached"), (
        trial_states(k8s_cluster, k8s_namespace), stack.logs())
    assert (last["trials"], last["succeeded"], last["killed"]) == (4, 3, 1)
    assert 10 <= last["elapsedBefore"] < 25


def test_raising_max_failed_trials_continues_a_failed_experiment_but_not_one_that_reached_its_goal(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """The same rule for every budget field; GoalReached holds whatever the budget."""
    make_kubelet(gpus=2)
    crash = curve_spec(budget={"maxTrials": 3, "parallelTrials": 1, "maxFailedTrials": 1})
    crash["trialTemplate"] = dict(crash["trialTemplate"], command=["python", "-c", "import sys; sys.exit(3)"])
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("flaky", k8s_namespace, **crash))
    goal = curve_spec(objective={"metric": "score", "goal": "maximize", "target": 0.1},
                      budget={"maxTrials": 2, "parallelTrials": 1})
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("goal", k8s_namespace, **goal))
    failed = wait_phase(k8s_cluster, k8s_namespace, "flaky", stack, timeout=60)
    assert (failed["phase"], ended_by(failed), failed["failed"]) == ("Failed", "MaxFailedTrialsReached", 2)
    reached = wait_phase(k8s_cluster, k8s_namespace, "goal", stack, timeout=60)
    assert (ended_by(reached), reached["trials"]) == ("GoalReached", 1)

    edit(k8s_cluster, k8s_namespace, "goal", {"budget": {"maxTrials": 5}})
    assert judged(k8s_cluster, k8s_namespace, "goal", stack)["completionTime"] == reached["completionTime"]
    edit(k8s_cluster, k8s_namespace, "flaky", {"budget": {"maxFailedTrials": 2},
                                               "trialTemplate": {"command": ["python", str(TRIALS / "curve.py")]}})
    wait_until(lambda: not get(k8s_cluster, "experiment", k8s_namespace, "flaky")["status"].get("completionTime")
               or get(k8s_cluster, "experiment", k8s_namespace, "flaky")["status"].get("continuedTime"),
               timeout=30, interval=0.2, what="the experiment to go on")
    last = wait_phase(k8s_cluster, k8s_namespace, "flaky", stack, timeout=60)
    assert (last["phase"], ended_by(last)) == ("Succeeded", "MaxTrialsReached"), trial_states(k8s_cluster, k8s_namespace)
    assert (last["trials"], last["failed"], last["succeeded"]) == (3, 2, 1)
    events = k8s_cluster.kubectl("get", "events", "-n", k8s_namespace, "-o", "json").stdout
    assert "MaxFailedTrialsReached no longer holds" in events
    assert get(k8s_cluster, "experiment", k8s_namespace, "goal")["status"]["trials"] == 1


def steps_of(t) -> list[float]:
    return [p[0] for p in t["status"].get("intermediate", [])]


def pods_of(cluster, namespace, trial) -> list[str]:
    return sorted(p["metadata"]["name"] for p in get(cluster, "pods", namespace)["items"]
                  if p["metadata"]["labels"].get("kubetune.io/trial") == trial)


def sha_spec(tmp_path, step_seconds=0.05):
    spec = curve_spec(budget={"maxTrials": 9, "parallelTrials": 3},
                      earlyStopping={"name": "sha", "settings": {"resource": "epoch", "min": 1, "max": 9,
                                                                 "reductionFactor": 3}})
    spec["trialTemplate"]["env"] = [{"name": "KUBETUNE_CHECKPOINT_DIR", "value": str(tmp_path / "checkpoints")},
                                    {"name": "STEP_SECONDS", "value": str(step_seconds)}]
    return spec


def assert_successive_halving_ran_as_in_the_paper(cluster, namespace, status, pods_kept=True):
    """Nine trials paused at epoch 1, the best three resumed from their checkpoints to epoch 3, the best
    of those to 9: each run in a pod of its own (still there unless pods_kept is False), starting after
    its checkpoint's step."""
    states = trial_states(cluster, namespace)
    assert status["phase"] == "Succeeded", states
    assert (status["succeeded"], status["pruned"], status["paused"], status["trials"]) == (1, 8, 0, 9), states
    trials = sorted(get(cluster, "trials", namespace)["items"],
                    key=lambda t: -(1 - (t["spec"]["params"]["x"] - 0.3) ** 2))  # best configuration first
    assert [steps_of(t) for t in trials] == [[1, 2, 3, 4, 5, 6, 7, 8, 9]] + [[1, 2, 3]] * 2 + [[1]] * 6, states
    winner = trials[0]
    assert winner["status"]["state"] == "Succeeded" and status["bestTrial"]["name"] == winner["metadata"]["name"]
    name = winner["metadata"]["name"]
    if pods_kept:
        assert pods_of(cluster, namespace, name) == [name, f"{name}-resume1", f"{name}-resume2"]
    resumes = [e for e in winner["status"]["events"] if e["event"] == "resume"]
    assert [(e["budget"], e["from_step"]) for e in resumes] == [(3, 1), (9, 3)]
    assert all(t["status"]["reason"].startswith("not promoted") for t in trials[1:]), states
    assert all(t["spec"].get("attempt", 1) == 1 for t in trials)


def test_synchronous_successive_halving_resumes_the_winners_in_new_pods_from_their_checkpoints(
        k8s_cluster, k8s_namespace, make_kubelet, stack, tmp_path):
    make_kubelet(gpus=3)
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("sha", k8s_namespace, **sha_spec(tmp_path)))
    status = wait_phase(k8s_cluster, k8s_namespace, "sha", stack)
    assert_successive_halving_ran_as_in_the_paper(k8s_cluster, k8s_namespace, status)


def test_paused_trials_survive_restarts_of_the_service_and_the_operator(
        k8s_cluster, k8s_namespace, make_kubelet, stack, tmp_path):
    """The suggestion service is killed while trials wait paused, the operator once the first winner
    has resumed: the rebuilt scheduler promotes the same trials, and nothing runs twice."""
    make_kubelet(gpus=3)
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("sha", k8s_namespace, **sha_spec(tmp_path, 0.15)))

    def trials_where(check):
        return [t for t in get(k8s_cluster, "trials", k8s_namespace)["items"] if check(t.get("status") or {})]

    wait_until(lambda: len(trials_where(lambda s: s.get("state") == "Paused")) >= 3, timeout=120,
               what="three paused trials")
    stack.kill("suggestion")
    stack.start("suggestion")
    wait_until(lambda: trials_where(lambda s: any(e.get("event") == "resume" for e in s.get("events", []))),
               timeout=120, what="a resumed trial")
    stack.kill("operator")
    stack.start("operator")
    status = wait_phase(k8s_cluster, k8s_namespace, "sha", stack, timeout=180)
    assert_successive_halving_ran_as_in_the_paper(k8s_cluster, k8s_namespace, status)


def test_promotion_asha_resumes_paused_trials_on_the_cluster_and_leaves_none_paused(
        k8s_cluster, k8s_namespace, make_kubelet, stack, tmp_path):
    """ASHA's promotion form: a trial pauses at each rung and a free worker resumes the best paused one
    in the top 1/eta of its rung, from its checkpoint; trials still paused when the budget is spent and
    none can be promoted end Pruned."""
    make_kubelet(gpus=3)
    spec = curve_spec(budget={"maxTrials": 9, "parallelTrials": 3},
                      earlyStopping={"name": "asha", "settings": {"resource": "epoch", "min": 1, "max": 9,
                                                                  "reductionFactor": 3, "mode": "promotion"}})
    spec["trialTemplate"]["env"] = [{"name": "KUBETUNE_CHECKPOINT_DIR", "value": str(tmp_path / "checkpoints")}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("asha", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "asha", stack)
    states = trial_states(k8s_cluster, k8s_namespace)
    assert status["phase"] == "Succeeded" and status["paused"] == 0, states
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    assert {t["status"]["state"] for t in trials} <= {"Succeeded", "Pruned"}, states
    resumed = [t for t in trials if any(e["event"] == "resume" for e in t["status"]["events"])]
    assert resumed, states
    for t in trials:  # each run went on from the one before: every step once, in order
        steps = steps_of(t)
        assert steps == list(range(1, len(steps) + 1)), (t["metadata"]["name"], steps)
        assert (steps[-1] == 9) == (t["status"]["state"] == "Succeeded"), states
    for t in resumed:
        name = t["metadata"]["name"]
        n = sum(e["event"] == "resume" for e in t["status"]["events"])
        assert pods_of(k8s_cluster, k8s_namespace, name) == sorted([name] + [f"{name}-resume{k}" for k in range(1, n + 1)])


def test_two_gpus_run_at_most_two_trial_pods_at_once(k8s_cluster, k8s_namespace, make_kubelet, stack):
    kubelet = make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 6, "parallelTrials": 4})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.15"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("gpus", k8s_namespace, **spec))
    most = 0
    pending_seen = False

    def over():
        nonlocal most, pending_seen
        most = max(most, len(kubelet.running_pods()))
        pods = get(k8s_cluster, "pods", k8s_namespace)["items"]
        pending_seen |= any(p["status"].get("phase") == "Pending" for p in pods)
        status = get(k8s_cluster, "experiment", k8s_namespace, "gpus").get("status") or {}
        return status.get("completionTime")

    wait_until(over, timeout=120, what="the experiment to finish", interval=0.05)
    status = get(k8s_cluster, "experiment", k8s_namespace, "gpus")["status"]
    assert status["phase"] == "Succeeded" and status["succeeded"] == 6
    assert most == 2
    assert pending_seen, "with 4 trials wanted and 2 GPUs, some pods wait Pending"


def test_killing_operator_service_and_redis_loses_nothing_and_duplicates_nothing(
        k8s_cluster, k8s_namespace, make_kubelet, stack, redis_server):
    make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 10, "parallelTrials": 2, "maxFailedTrials": 4})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.12"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("survivor", k8s_namespace, **spec))

    def finished():
        items = get(k8s_cluster, "trials", k8s_namespace)["items"]
        return {t["metadata"]["name"]: t["status"] for t in items
                if (t.get("status") or {}).get("state") in ("Succeeded", "Failed")}

    def kill_when(n_finished, which):
        wait_until(lambda: len(finished()) >= n_finished, timeout=120, what=f"{n_finished} finished trials")
        before = finished()
        if which == "redis":
            redis_server.kill()
            redis_server.restart(keep_data=True)
        else:
            stack.kill(which)
            stack.start(which)
        return before

    snapshots = [kill_when(2, "operator"), kill_when(4, "suggestion"), kill_when(6, "redis")]
    status = wait_phase(k8s_cluster, k8s_namespace, "survivor", stack, timeout=180)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    names = sorted(t["metadata"]["name"] for t in trials)
    assert names == [f"survivor-{n:04d}" for n in range(10)], "no duplicate and no missing trial"
    numbers = [t["spec"]["number"] for t in trials]
    assert len(set(numbers)) == 10
    final = finished()
    for snapshot in snapshots:
        for name, recorded in snapshot.items():
            assert final[name]["state"] == recorded["state"]
            assert final[name].get("value") == recorded.get("value"), f"{name} changed after it finished"
    succeeded = [t for t in trials if t["status"]["state"] == "Succeeded"]
    assert len(succeeded) >= 10 - 4
    for t in succeeded:
        x = t["spec"]["params"]["x"]
        assert t["status"]["value"] == pytest.approx((1 - (x - 0.3) ** 2) * (1 - 0.5 ** 9))


def test_a_suggestion_service_restarted_mid_trial_takes_the_reports_sent_while_it_was_down(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """The service is down while the trials end: the operator waits for it rather than recording what
    the API holds (the last reports are on the bus). Every trial exists from the start (parallelTrials
    = maxTrials), so the first request the restarted service gets is that flush: it must rebuild the
    experiment reading the stream the pods wrote (its key holds the experiment's uid)."""
    kubelet = make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.5"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("downtime", k8s_namespace, **spec))

    def reported(n):
        items = get(k8s_cluster, "trials", k8s_namespace)["items"]
        return len(items) == 2 and all(len((t.get("status") or {}).get("intermediate") or []) >= n for t in items)

    wait_until(lambda: reported(2), timeout=60, interval=0.2, what="both trials to report twice")
    stack.kill("suggestion")
    wait_until(lambda: not kubelet.running_pods(), timeout=60, what="both trials to end while the service is down")
    stack.start("suggestion")
    status = wait_phase(k8s_cluster, k8s_namespace, "downtime", stack)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    for t in get(k8s_cluster, "trials", k8s_namespace)["items"]:
        x = t["spec"]["params"]["x"]
        assert [s for s, _ in t["status"]["intermediate"]] == list(range(1, 10))
        assert t["status"]["value"] == pytest.approx((1 - (x - 0.3) ** 2) * (1 - 0.5 ** 9))


def test_asha_prunes_trials_through_the_redis_bus(k8s_cluster, k8s_namespace, make_kubelet, stack):
    make_kubelet(gpus=4)
    spec = curve_spec(budget={"maxTrials": 12, "parallelTrials": 4},
                      earlyStopping={"name": "asha", "settings": {"resource": "step", "min": 1, "max": 9,
                                                                  "reductionFactor": 3}})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.1"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("asha", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "asha", stack)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    pruned = [t for t in trials if t["status"]["state"] == "Pruned"]
    done = [t for t in trials if t["status"]["state"] == "Succeeded"]
    assert pruned and done and status["pruned"] == len(pruned)
    for t in pruned:
        # Stopped at a rung: fewer reports than a full trial, and its process did exit.
        assert len(t["status"]["intermediate"]) < 9
    assert all(len(t["status"]["intermediate"]) == 9 for t in done)
    best = max(done, key=lambda t: t["status"]["value"])
    assert status["bestTrial"]["name"] == best["metadata"]["name"]


def test_pbt_exploits_in_place_without_restarting_the_pod(k8s_cluster, k8s_namespace, make_kubelet, stack, tmp_path):
    make_kubelet(gpus=4)
    spec = curve_spec(
        parameters=[{"name": "lr", "type": "double", "min": 0.001, "max": 0.3, "log": True}],
        budget={"maxTrials": 4, "parallelTrials": 4},
        earlyStopping={"name": "pbt", "settings": {"perturbationInterval": 4, "quantileFraction": 0.25}})
    spec["trialTemplate"]["command"] = ["python", str(TRIALS / "pbt_toy.py")]
    spec["trialTemplate"]["env"] = [{"name": "KUBETUNE_CHECKPOINT_DIR", "value": str(tmp_path / "checkpoints")},
                                    {"name": "STEP_SECONDS", "value": "0.1"}]
    spec["objective"]["strategy"] = "latest"
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("pbt", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "pbt", stack)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    exploited = [t for t in trials if any(e["event"] == "exploit" for e in t["status"].get("events", []))]
    assert exploited, "the bottom quarter should have taken a better trial's checkpoint"
    for t in exploited:
        e = next(e for e in t["status"]["events"] if e["event"] == "exploit")
        assert t["status"]["params"] != t["spec"]["params"]  # explored parameters are recorded
        assert 0 <= e["donor"] < 4 and e["donor"] != t["spec"]["number"]
        # One pod, one attempt: the trial went on in the same process.
        assert t["spec"].get("attempt", 1) == 1 and t["status"]["podName"] == t["metadata"]["name"]
        assert all(b[0] > a[0] for a, b in zip(t["status"]["intermediate"], t["status"]["intermediate"][1:]))


def test_synchronous_pbt_waits_for_every_pod_but_not_for_one_that_died(k8s_cluster, k8s_namespace, make_kubelet,
                                                                         stack, tmp_path):
    """synch over Redis and the suggestion service: pods start apart, each check waits for the whole
    population (so every donor is at the taker's step); trial 2's pod fails at step 5 and the operator's
    flush of it releases the checks at step 6."""
    make_kubelet(gpus=4)
    spec = curve_spec(
        parameters=[{"name": "lr", "type": "double", "min": 0.001, "max": 0.3, "log": True}],
        budget={"maxTrials": 4, "parallelTrials": 4, "maxFailedTrials": 1},
        earlyStopping={"name": "pbt", "settings": {"perturbationInterval": 3, "quantileFraction": 0.25,
                                                   "synch": True}})
    spec["trialTemplate"]["command"] = ["python", str(TRIALS / "pbt_toy.py")]
    spec["trialTemplate"]["env"] = [{"name": "KUBETUNE_CHECKPOINT_DIR", "value": str(tmp_path / "checkpoints")},
                                    {"name": "STEPS", "value": "12"}, {"name": "STEP_SECONDS", "value": "0.05"},
                                    {"name": "START_DELAY", "value": "0.5"}, {"name": "CRASH_TRIAL", "value": "2"},
                                    {"name": "CRASH_STEP", "value": "5"}]
    spec["objective"]["strategy"] = "latest"
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("synch", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "synch", stack)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    trials = {t["spec"]["number"]: t for t in get(k8s_cluster, "trials", k8s_namespace)["items"]}
    assert trials[2]["status"]["state"] == "Failed"
    exploits = [e for t in trials.values() for e in t["status"].get("events", []) if e["event"] == "exploit"]
    assert exploits, trial_states(k8s_cluster, k8s_namespace)
    assert all(e["donor_step"] == e["step"] for e in exploits), exploits
    for n, t in trials.items():
        steps = [s for s, _ in t["status"]["intermediate"]]
        assert steps == list(range(1, len(steps) + 1))
        assert len(steps) == (4 if n == 2 else 12)
    # The check at the last step (12) gives the worst of the 3 live members an exploit it never
    # trains with: once its pod is gone, the service records it as unused and gives back its parameters.
    assert all(e["step"] < 12 for e in exploits)
    unused = [(t, e) for t in trials.values() for e in t["status"].get("events", []) if e["event"] == "exploit-unused"]
    assert [e["step"] for _, e in unused] == [12], trial_states(k8s_cluster, k8s_namespace)
    assert unused[0][0]["status"]["params"] == unused[0][1]["old"]


def test_a_trial_lost_with_its_node_runs_again_elsewhere(k8s_cluster, k8s_namespace, make_kubelet, stack):
    # Two nodes: when every node goes silent the node controller evicts nothing (as in a real cluster).
    # Both trials are created at once, so no later suggest request tells the suggestion service of the
    # retry: the operator does (else the new attempt's reports go on from the lost one's).
    survivor = make_kubelet(gpus=1)
    doomed = make_kubelet(gpus=1)
    spec = curve_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.6"}, {"name": "JITTER", "value": "1"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("nodeloss", k8s_namespace, **spec))
    wait_until(lambda: doomed.running_pods(), timeout=60, what="a trial on the node to be lost")
    lost_pod = doomed.running_pods()[0].split("/")[1]

    def reported(n):
        trial = next(t for t in get(k8s_cluster, "trials", k8s_namespace)["items"] if t["metadata"]["name"] == lost_pod)
        return len((trial.get("status") or {}).get("intermediate") or []) >= n

    wait_until(lambda: reported(3), timeout=60, what="the trial on the node to be lost to report 3 steps")
    doomed.lose()
    status = wait_phase(k8s_cluster, k8s_namespace, "nodeloss", stack, timeout=180)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    assert status.get("retries") == 1
    trials = {t["metadata"]["name"]: t for t in get(k8s_cluster, "trials", k8s_namespace)["items"]}
    assert sorted(trials) == [f"nodeloss-{n:04d}" for n in range(2)]
    retried = trials[lost_pod]
    assert retried["spec"]["attempt"] == 2 and retried["status"]["state"] == "Succeeded"
    assert retried["status"]["podName"] == f"{lost_pod}-r2"
    assert survivor.run_of(k8s_namespace, f"{lost_pod}-r2") is not None
    # Its record holds the new attempt's reports only, each step once (the suggestion service
    # dropped the 3 or more the lost attempt had reported; its values differ: JITTER).
    assert [s for s, _ in retried["status"]["intermediate"]] == list(range(1, 10))
    events = k8s_cluster.kubectl("get", "events", "-n", k8s_namespace, "--field-selector", "reason=TrialRetried").stdout
    assert lost_pod in events


def test_a_pod_cut_off_from_the_api_but_still_running_cannot_mix_into_its_retry(k8s_cluster, k8s_namespace,
                                                                                  make_kubelet, stack):
    """A node loses the API server but not Redis: the operator runs the trial again elsewhere, while the
    first pod trains on. Its reports must not enter the new attempt's record, nor its answers the
    new pod's queue: it hears that it was superseded and stops."""
    doomed = make_kubelet(gpus=1)
    spec = curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})
    # The first pod reports once a second for 40 s, well past the retry (~20 s after the partition).
    spec["trialTemplate"]["env"] = [{"name": "STEPS", "value": "40"}, {"name": "FIRST_ATTEMPT_STEP_SECONDS", "value": "1"},
                                    {"name": "STEP_SECONDS", "value": "0.05"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("partition", k8s_namespace, **spec))
    wait_until(lambda: doomed.running_pods(), timeout=60, what="the trial on the node to be cut off")
    first_pod = doomed.running_pods()[0].split("/")[1]
    make_kubelet(gpus=1)  # where the retry runs (with no node left Ready, nothing would be evicted)

    def reported(n):
        trial = get(k8s_cluster, "trials", k8s_namespace)["items"][0]
        return len((trial.get("status") or {}).get("intermediate") or []) >= n

    wait_until(lambda: reported(3), timeout=60, what="the first pod to report 3 steps")
    doomed.partition()
    status = wait_phase(k8s_cluster, k8s_namespace, "partition", stack, timeout=180)
    assert status["phase"] == "Succeeded" and status.get("retries") == 1, trial_states(k8s_cluster, k8s_namespace)
    trial = get(k8s_cluster, "trials", k8s_namespace)["items"][0]
    assert trial["spec"]["attempt"] == 2 and trial["status"]["podName"] == f"{first_pod}-r2"
    assert [s for s, _ in trial["status"]["intermediate"]] == list(range(1, 41))  # the new pod's steps, each once
    first = doomed.run_of(k8s_namespace, first_pod)
    wait_until(lambda: first.process.poll() is not None, timeout=60, what="the cut-off pod to stop")
    log = first.log_path.read_text()
    assert "superseded: the trial runs again as attempt 2" in log, log


def test_an_experiment_created_again_under_its_name_never_reads_the_deleted_ones_reports(
        k8s_cluster, k8s_namespace, make_kubelet, stack, redis_server):
    """kubectl delete, then apply again (a GitOps re-run): a pod of the deleted experiment that reports
    once more while it terminates must not land in the new experiment's trial of the same number.
    Deleting an experiment removes its keys from Redis."""
    import redis as redis_py

    from kubetune.bus import Report
    from kubetune.bus.redis_streams import RedisBus

    make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.3"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("rerun", k8s_namespace, **spec))
    assert wait_phase(k8s_cluster, k8s_namespace, "rerun", stack)["phase"] == "Succeeded"
    pod = get(k8s_cluster, "pods", k8s_namespace)["items"][0]
    old_key = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}["KUBETUNE_BUS_KEY"]
    r = redis_py.Redis.from_url(redis_server.url)
    pattern = f"kubetune:{{{k8s_namespace}/rerun*"
    assert r.keys(pattern), "the experiment's stream is in Redis while it exists"
    k8s_cluster.kubectl("delete", "experiment", "rerun", "-n", k8s_namespace)
    wait_until(lambda: not r.keys(pattern), timeout=30, what="the deleted experiment's keys to go")

    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "1"}]  # still running when the late report comes
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("rerun", k8s_namespace, **spec))

    def reporting():
        trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
        return trials and len((trials[0].get("status") or {}).get("intermediate") or []) >= 2

    wait_until(reporting, timeout=60, interval=0.2, what="the new experiment's trial to report")
    late = RedisBus(url=redis_server.url)
    late.publish(old_key, [Report(0, 99, 100.0, {"score": 123.0})])  # the old pod's last words
    late.close()
    status = wait_phase(k8s_cluster, k8s_namespace, "rerun", stack)
    assert status["phase"] == "Succeeded", (status, trial_states(k8s_cluster, k8s_namespace))
    uid = get(k8s_cluster, "experiment", k8s_namespace, "rerun")["metadata"]["uid"]
    [trial] = get(k8s_cluster, "trials", k8s_namespace)["items"]
    assert trial["metadata"]["ownerReferences"][0]["uid"] == uid, "the new experiment ran a trial of its own"
    assert [s for s, _ in trial["status"]["intermediate"]] == list(range(1, 10))
    assert trial["status"]["value"] < 1.0
    assert 0 < r.ttl(f"kubetune:{{{old_key}}}:reports")  # what it wrote after its keys went expires


def test_a_trial_without_the_sdk_reports_through_its_log(k8s_cluster, k8s_namespace, make_kubelet, stack):
    make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    spec["trialTemplate"]["command"] = ["sh", "-c", "echo 'epoch=1 score=0.5'; echo epoch=2 score=${x}"]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("stdout", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "stdout", stack)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    for t in get(k8s_cluster, "trials", k8s_namespace)["items"]:
        x = t["spec"]["params"]["x"]
        assert t["status"]["intermediate"] == [[1.0, 0.5], [2.0, pytest.approx(x)]]
        assert t["status"]["value"] == pytest.approx(max(0.5, x))


def example_for_test_cluster(name: str, namespace: str, tmp_path: Path, **budget) -> str:
    """An examples/k8s experiment as the test kubelet can run it: the image's trainer path points
    at trial_image/trainers, checkpoints go to a temporary folder instead of a volume."""
    doc = yaml.safe_load((ROOT / "examples" / "k8s" / name).read_text())
    doc["metadata"]["namespace"] = namespace
    spec = doc["spec"]
    spec["budget"].update(budget)
    template = spec["trialTemplate"]
    template["command"] = [a.replace("/kubetune/trainers", str(ROOT / "trial_image" / "trainers"))
                           for a in template["command"]]
    template.pop("podSpec", None)
    env = {e["name"]: e["value"] for e in template.get("env", [])}
    env["EPOCHS"] = str(min(int(env.get("EPOCHS", "9")), 9))
    if "KUBETUNE_CHECKPOINT_DIR" in env:
        env["KUBETUNE_CHECKPOINT_DIR"] = str(tmp_path / "checkpoints")
    template["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if spec.get("earlyStopping", {}).get("name") in ("asha", "hyperband"):
        spec["earlyStopping"]["settings"]["max"] = 9
    if spec.get("earlyStopping", {}).get("name") == "pbt":
        # Asynchronous PBT exploits only if some member reaches a check while another has
        # reported there too: with millisecond epochs and pods started one after another, the
        # first can finish before the last starts (the test then saw no exploit under load).
        # In generations, the bottom member at epoch 4 always exploits.
        spec["earlyStopping"]["settings"]["synch"] = True
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("name,budget", [("tpe.yaml", {"maxTrials": 6, "parallelTrials": 2}),
                                         ("asha.yaml", {"maxTrials": 9, "parallelTrials": 3}),
                                         ("hyperband.yaml", {"maxTrials": 9, "parallelTrials": 3}),
                                         ("pbt.yaml", {"maxTrials": 4, "parallelTrials": 4})])
def test_the_k8s_examples_run_the_pytorch_trainer(k8s_cluster, k8s_namespace, make_kubelet, stack, tmp_path,
                                                   name, budget):
    make_kubelet(gpus=4)
    manifest = example_for_test_cluster(name, k8s_namespace, tmp_path, **budget)
    experiment_name = yaml.safe_load(manifest)["metadata"]["name"]
    k8s_cluster.kubectl("apply", "-f", "-", input=manifest)
    status = wait_phase(k8s_cluster, k8s_namespace, experiment_name, stack, timeout=400)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    assert status["bestObjective"] > 0.5  # a real network learned the digits
    trials = get(k8s_cluster, "trials", k8s_namespace)["items"]
    if name == "asha.yaml":
        assert status["pruned"] >= 3
    if name == "pbt.yaml":
        assert any(e["event"] == "exploit" for t in trials for e in t["status"].get("events", []))
    if name == "tpe.yaml":
        assert status["succeeded"] == 6
    if name == "hyperband.yaml":  # one bracket of 9 (max 9): 3 resumed to epoch 3, 1 to epoch 9
        assert (status["succeeded"], status["pruned"], status["paused"]) == (1, 8, 0)
        [winner] = [t for t in trials if t["status"]["state"] == "Succeeded"]
        assert [s for s, _ in winner["status"]["intermediate"]] == list(range(1, 10))
        assert [e["budget"] for e in winner["status"]["events"] if e["event"] == "resume"] == [3, 9]


def test_a_pod_deleted_while_the_operator_is_down_runs_the_trial_again_as_a_new_attempt(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """The pod of a running trial is deleted while the operator is down (a node drained, a pod cleaned up):
    no watch event ever tells the restarted operator. It must see that the trial's pod is gone and run the
    trial again as a new attempt, not make the same attempt's pod again, whose reports then go on after
    the lost pod's in one record (steps 1, 2, 3, 1, 2, ...)."""
    make_kubelet(gpus=1)
    spec = curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.3"}, {"name": "JITTER", "value": "1"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("gone", k8s_namespace, **spec))

    def reported(n):
        items = get(k8s_cluster, "trials", k8s_namespace)["items"]
        return items and len((items[0].get("status") or {}).get("intermediate") or []) >= n

    wait_until(lambda: reported(3), timeout=60, what="the trial to report 3 steps")
    stack.kill("operator")
    k8s_cluster.kubectl("delete", "pod", "gone-0000", "-n", k8s_namespace, "--wait=true", "--timeout=60s")
    stack.start("operator")
    status = wait_phase(k8s_cluster, k8s_namespace, "gone", stack, timeout=120)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    [trial] = get(k8s_cluster, "trials", k8s_namespace)["items"]
    steps = [s for s, _ in trial["status"]["intermediate"]]
    assert steps == list(range(1, 10)), (steps, stack.logs())
    assert trial["spec"]["attempt"] == 2 and trial["status"]["podName"] == "gone-0000-r2"
    assert status.get("retries") == 1


def test_a_restarted_suggestion_service_schedules_the_running_trials_before_any_ends(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """The suggestion service restarts while every trial slot is taken: it holds nothing of the experiment,
    and its scheduler loop (pruning, PBT, writing reported values to the Trials) runs only once the operator
    sends the experiment again. That must not wait for a free slot, i.e. for a trial to end."""
    from tests.cluster.waiting import GiveUp

    make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    spec["trialTemplate"]["env"] = [{"name": "STEPS", "value": "40"}, {"name": "STEP_SECONDS", "value": "0.3"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("held", k8s_namespace, **spec))

    def reported():
        items = get(k8s_cluster, "trials", k8s_namespace)["items"]
        if any((t.get("status") or {}).get("state") in ("Succeeded", "Failed", "Pruned", "Killed") for t in items):
            raise GiveUp(f"a trial ended first:\n{trial_states(k8s_cluster, k8s_namespace)}\n{stack.logs()}")
        return {t["metadata"]["name"]: len((t.get("status") or {}).get("intermediate") or []) for t in items}

    wait_until(lambda: len(reported()) == 2 and min(reported().values()) >= 2, timeout=60,
               what="both trials to report")
    stack.kill("suggestion")
    stack.start("suggestion")
    at_restart = reported()
    # Reports written to the API again while both trials still run: the new service reads the bus.
    wait_until(lambda: all(n >= at_restart[name] + 5 for name, n in reported().items()), timeout=30,
               what="reported values to reach the Trials again after the restart")
    assert wait_phase(k8s_cluster, k8s_namespace, "held", stack)["phase"] == "Succeeded"


def test_a_trial_whose_pod_the_control_plane_marked_failed_as_disrupted_runs_again(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """A node gone for good (a spot instance reclaimed, its Node object deleted): the pod garbage collector
    marks its pods Failed with a DisruptionTarget condition, then deletes them (as node-pressure eviction
    marks them Failed, reason Evicted). The trial did not fail: it runs again, as for a pod evicted while
    running, instead of counting as a failed trial."""
    doomed = make_kubelet(gpus=1)
    spec = curve_spec(budget={"maxTrials": 1, "parallelTrials": 1})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.3"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("reclaimed", k8s_namespace, **spec))
    wait_until(lambda: doomed.running_pods(), timeout=60, what="the trial to run")

    def reported(n):
        [trial] = get(k8s_cluster, "trials", k8s_namespace)["items"]
        return len((trial.get("status") or {}).get("intermediate") or []) >= n

    wait_until(lambda: reported(2), timeout=60, what="the trial to report")
    make_kubelet(gpus=1)
    doomed.lose()
    # What the pod garbage collector writes for a pod of a deleted node, in its order.
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
                 "message": "PodGC: node no longer exists", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    k8s_cluster.kubectl("patch", "pod", "reclaimed-0000", "-n", k8s_namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"phase": "Failed", "conditions": [condition]}}))
    k8s_cluster.kubectl("delete", "pod", "reclaimed-0000", "-n", k8s_namespace, "--grace-period=0", "--force",
                        "--ignore-not-found")
    status = wait_phase(k8s_cluster, k8s_namespace, "reclaimed", stack, timeout=120)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    [trial] = get(k8s_cluster, "trials", k8s_namespace)["items"]
    assert trial["spec"]["attempt"] == 2 and trial["status"]["state"] == "Succeeded"
    assert [s for s, _ in trial["status"]["intermediate"]] == list(range(1, 10))
    assert status.get("retries") == 1


def test_an_experiment_name_too_long_for_its_trials_is_refused_naming_the_field(k8s_cluster, k8s_namespace, crds):
    """Its trials are named <name>-<number> and carry that name as a label value (at most 63 characters):
    with a longer experiment name every trial's creation failed, and the experiment never ran."""
    long = "a" * 58
    result = k8s_cluster.kubectl("apply", "-f", "-", input=experiment(long, k8s_namespace, **curve_spec()), check=False)
    assert result.returncode != 0 and "metadata.name" in result.stderr and "at most 57 characters" in result.stderr
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("a" * 57, k8s_namespace, **curve_spec()))



def test_trials_deleted_by_hand_count_as_killed_and_their_numbers_are_never_used_again(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """`kubectl delete trial` on a finished trial and on a running one: the experiment goes on and ends (it
    hung before: the operator's list of trials had a gap, and the service dropped every trial after it), the
    other trials run undisturbed, and no trial is created again under a deleted one's number (its metric
    stream and checkpoints are still there)."""
    make_kubelet(gpus=2)
    spec = curve_spec(budget={"maxTrials": 5, "parallelTrials": 2})
    spec["trialTemplate"]["env"] = [{"name": "STEP_SECONDS", "value": "0.3"}]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("gap", k8s_namespace, **spec))

    def trials():
        return {t["metadata"]["name"]: t for t in get(k8s_cluster, "trials", k8s_namespace)["items"]}

    def first_done_third_running():
        items = trials()
        return ((items.get("gap-0000", {}).get("status") or {}).get("state") == "Succeeded"
                and len((items.get("gap-0002", {}).get("status") or {}).get("intermediate") or []) >= 2)

    wait_until(first_done_third_running, timeout=90, what="trial 0 to succeed and trial 2 to report twice")
    k8s_cluster.kubectl("delete", "trial", "gap-0000", "gap-0002", "-n", k8s_namespace, "--wait=true")
    status = wait_phase(k8s_cluster, k8s_namespace, "gap", stack, timeout=120)
    assert status["phase"] == "Succeeded", trial_states(k8s_cluster, k8s_namespace)
    left = trials()
    assert sorted(left) == ["gap-0001", "gap-0003", "gap-0004"], (trial_states(k8s_cluster, k8s_namespace), stack.logs())
    for t in left.values():
        assert t["status"]["state"] == "Succeeded"
        assert [s for s, _ in t["status"]["intermediate"]] == list(range(1, 10))
    assert (status["trials"], status["succeeded"], status["killed"], status["created"]) == (5, 3, 2, 5)


SLEEP_FOREVER = "import time; time.sleep(3600)"


def marking_sidecar(folder: Path) -> str:
    """A sidecar that never exits, leaving a file named for its pod in folder once it runs."""
    folder.mkdir(exist_ok=True)
    return f"import os, time; open(os.path.join({str(folder)!r}, os.environ['HOSTNAME']), 'w'); time.sleep(3600)"


def with_sidecar(spec, code=SLEEP_FOREVER, name="shipper", native=False):
    """spec whose trial template's podSpec has a second container (a log shipper, an injected proxy) running code:
    a regular one, or a native sidecar (an init container with restartPolicy Always)."""
    sidecar = {"name": name, "image": "kubetune/trial:test", "command": [sys.executable, "-c", code]}
    spec["trialTemplate"]["podSpec"] = {"containers": [{"name": "trial"}] + ([] if native else [sidecar])}
    if native:
        spec["trialTemplate"]["podSpec"]["initContainers"] = [{**sidecar, "restartPolicy": "Always"}]
    return spec


def experiment_pods(cluster, namespace, name) -> list[str]:
    return sorted(p["metadata"]["name"] for p in get(cluster, "pods", namespace)["items"]
                  if p["metadata"]["labels"].get("kubetune.io/experiment") == name)


@pytest.mark.parametrize("native", [False, True], ids=["container", "native"])
def test_a_sidecar_that_never_exits_does_not_keep_its_trials_running(k8s_cluster, k8s_namespace, make_kubelet,
                                                                       stack, tmp_path, native):
    """Katib's #1638: a sidecar keeps the pod Running after the trial's container has exited. The trial ends
    with its own container, and its pod is deleted so the sidecar stops and the GPU is free. (A native sidecar
    is stopped by the kubelet itself once the trial's container is over: its pod ends Succeeded, and stays.)"""
    kubelet = make_kubelet(gpus=2)
    spec = with_sidecar(curve_spec(budget={"maxTrials": 4, "parallelTrials": 2}), marking_sidecar(tmp_path / "ran"),
                        native=native)
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("istio", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "istio", stack, timeout=90)
    states = trial_states(k8s_cluster, k8s_namespace)
    assert status["phase"] == "Succeeded" and status["succeeded"] == 4, (states, stack.logs())
    for t in get(k8s_cluster, "trials", k8s_namespace)["items"]:
        x = t["spec"]["params"]["x"]
        assert t["status"]["value"] == pytest.approx((1 - (x - 0.3) ** 2) * (1 - 0.5 ** 9)), states
        assert (tmp_path / "ran" / t["metadata"]["name"]).exists()  # (its sidecar did run)
    if native:
        wait_until(lambda: {p["status"].get("phase") for p in get(k8s_cluster, "pods", k8s_namespace)["items"]}
                   == {"Succeeded"}, timeout=30, what="the trials' pods to succeed")
    else:
        wait_until(lambda: not experiment_pods(k8s_cluster, k8s_namespace, "istio"), timeout=30,
                   what="the trials' pods to be deleted")
    wait_until(lambda: kubelet.running_pods() == [], timeout=30, what="every process of the pods to end")


def test_a_trial_is_judged_by_its_own_container_never_by_a_sidecar(k8s_cluster, k8s_namespace, make_kubelet, stack):
    """A sidecar that fails at once fails no trial whose container succeeds; a trial container that fails makes
    its trial Failed while its sidecar runs on."""
    make_kubelet(gpus=2)
    shaky = with_sidecar(curve_spec(budget={"maxTrials": 2, "parallelTrials": 1}), "import sys; sys.exit(7)")
    broken = with_sidecar(curve_spec(budget={"maxTrials": 1, "parallelTrials": 1}))
    broken["trialTemplate"]["command"] = ["python", "-c", "import sys; print('diverged'); sys.exit(3)"]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("shaky", k8s_namespace, **shaky))
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("broken", k8s_namespace, **broken))
    wait_phase(k8s_cluster, k8s_namespace, "broken", stack, timeout=90)
    status = wait_phase(k8s_cluster, k8s_namespace, "shaky", stack, timeout=90)
    states = trial_states(k8s_cluster, k8s_namespace)
    assert status["phase"] == "Succeeded" and status["succeeded"] == 2, (states, stack.logs())
    [failed] = [t for t in get(k8s_cluster, "trials", k8s_namespace)["items"] if t["spec"]["experiment"] == "broken"]
    assert failed["status"]["state"] == "Failed", states
    assert failed["status"]["reason"].startswith("exited with code 3"), states
    wait_until(lambda: not experiment_pods(k8s_cluster, k8s_namespace, "broken"), timeout=30,
               what="the failed trial's pod to be deleted")


def test_paused_trials_with_a_sidecar_resume_from_their_checkpoints(k8s_cluster, k8s_namespace, make_kubelet, stack,
                                                                    tmp_path):
    """Successive halving with a sidecar in every pod: a trial that saved its checkpoint and exited is Paused
    (not Succeeded), its pod deleted, and the winners resume in new pods as without a sidecar."""
    make_kubelet(gpus=3)
    spec = with_sidecar(sha_spec(tmp_path), marking_sidecar(tmp_path / "ran"))
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("sha", k8s_namespace, **spec))
    status = wait_phase(k8s_cluster, k8s_namespace, "sha", stack, timeout=120)
    assert_successive_halving_ran_as_in_the_paper(k8s_cluster, k8s_namespace, status, pods_kept=False)
    winner = status["bestTrial"]["name"]
    assert all((tmp_path / "ran" / pod).exists() for pod in (winner, f"{winner}-resume1", f"{winner}-resume2"))
    wait_until(lambda: not experiment_pods(k8s_cluster, k8s_namespace, "sha"), timeout=30,
               what="the trials' pods to be deleted")


LAST_WORDS = """
import os, sys
if sys.argv[1] == "crash":
    print("loading data", flush=True)
    raise ValueError("the data set is empty")
with open(os.environ["KUBETUNE_TERMINATION_LOG"], "w") as f:  # what the SDK writes of reports it lost
    f.write("kubetune.trial: 3 reports never reached the metric bus: ConnectionError: refused\\n")
"""


def test_a_trials_reason_on_the_cluster_is_its_last_log_line_or_what_it_left_in_its_termination_log(
        k8s_cluster, k8s_namespace, make_kubelet, stack):
    """A crashed trial's reason read `exited with code 1: Error`; it shows the exception now (the log's end,
    FallbackToLogsOnError). A trial that exits 0 with no value says why: the SDK's line about reports that
    never reached the bus, left in the termination log."""
    make_kubelet(gpus=2)
    spec = curve_spec(parameters=[{"name": "mode", "type": "categorical", "values": ["crash", "silent"]}],
                      algorithm={"name": "grid"}, budget={"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 2})
    spec["trialTemplate"]["command"] = ["python", "-c", LAST_WORDS, "${mode}"]
    k8s_cluster.kubectl("apply", "-f", "-", input=experiment("words", k8s_namespace, **spec))
    wait_phase(k8s_cluster, k8s_namespace, "words", stack)
    reasons = {t["spec"]["params"]["mode"]: t["status"]["reason"] for t in get(k8s_cluster, "trials", k8s_namespace)["items"]}
    assert reasons == {
        "crash": "exited with code 1: ValueError: the data set is empty",
        "silent": "no value for objective metric 'score' was reported: kubetune.trial: 3 reports never reached "
                  "the metric bus: ConnectionError: refused"}, stack.logs()
