"""The trial pod the operator builds (no cluster): what it adds for the metric bus, and what it refuses."""

from __future__ import annotations

import copy

import pytest

from kubetune.api.spec import ExperimentSpec
from kubetune.operator.pods import CA_DIR, CA_VOLUME, template_clashes, trial_pod
from tests.test_operator import curve_spec

BUS = {"url": "rediss://redis.example:6380/0", "passwordSecret": {"name": "kubetune-redis", "key": "password"},
       "caSecret": {"name": "redis-ca", "key": "ca.crt"}}


def experiment_doc(**over) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "exp", "namespace": "team-a", "uid": "e-uid"}, "spec": curve_spec(**over)}


def pod_for(doc: dict, bus: dict, status: dict | None = None) -> dict:
    trial = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Trial",
             "metadata": {"name": "exp-0000", "namespace": "team-a", "uid": "t-uid",
                          "ownerReferences": [{"kind": "Experiment", "name": "exp", "uid": "e-uid"}]},
             "spec": {"experiment": "exp", "number": 0, "params": {"x": 0.5}}, "status": status or {}}
    return trial_pod(ExperimentSpec.from_document(doc), trial, bus)


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_a_ca_secret_is_mounted_read_only_in_the_trial_container_with_its_file_named_in_the_env():
    doc = experiment_doc()
    doc["spec"]["trialTemplate"]["podSpec"] = {
        "containers": [{"name": "trial", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                       {"name": "sidecar", "image": "busybox"}],
        "volumes": [{"name": "data", "emptyDir": {}}]}
    pod = pod_for(doc, BUS)
    main, sidecar = pod["spec"]["containers"]
    assert pod["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}, {
        "name": CA_VOLUME, "secret": {"secretName": "redis-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
    assert main["volumeMounts"] == [{"name": "data", "mountPath": "/data"},
                                    {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}]
    env = env_of(main)
    assert env["KUBETUNE_REDIS_CA_FILE"] == "/var/run/kubetune/redis-ca/ca.crt"
    assert env["KUBETUNE_REDIS_URL"] == BUS["url"]
    assert env["KUBETUNE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "kubetune-redis", "key": "password"}}
    assert "volumeMounts" not in sidecar and "env" not in sidecar
    assert template_clashes(doc["spec"], BUS) == []
    # The template the pod was built from is left as it was (the next pod is built from it again).
    assert [v["name"] for v in doc["spec"]["trialTemplate"]["podSpec"]["volumes"]] == ["data"]


@pytest.mark.parametrize("bus", [{k: v for k, v in BUS.items() if k != "caSecret"}, {"caSecret": BUS["caSecret"]}],
                         ids=["no-ca", "no-bus"])
def test_nothing_is_added_without_a_ca_secret_or_without_a_bus(bus):
    pod = pod_for(experiment_doc(), bus)
    [main] = pod["spec"]["containers"]
    assert "volumes" not in pod["spec"] and "volumeMounts" not in main
    assert "KUBETUNE_REDIS_CA_FILE" not in env_of(main)


def test_a_template_using_the_reserved_names_is_refused_naming_the_field():
    doc = experiment_doc(trialTemplate={
        "command": ["python", "t.py"], "env": [{"name": "KUBETUNE_REDIS_CA_FILE", "value": "/mine/ca.crt"}],
        "podSpec": {"containers": [{"name": "trial",
                                    "env": [{"name": "KUBETUNE_REDIS_CA_FILE", "value": "/x"}],
                                    "volumeMounts": [{"name": "mine", "mountPath": "/var/run/kubetune/redis-ca/"}]}],
                    "volumes": [{"name": "mine", "emptyDir": {}}, {"name": CA_VOLUME, "emptyDir": {}}]}})
    problems = [str(p) for p in template_clashes(doc["spec"], BUS)]
    assert [p.split(":")[0] for p in problems] == [
        "spec.trialTemplate.podSpec.volumes[1].name",
        "spec.trialTemplate.podSpec.containers[0].volumeMounts[0].mountPath",
        "spec.trialTemplate.env[0].name",
        "spec.trialTemplate.podSpec.containers[0].env[0].name"]
    assert all("reserved for the Redis CA" in p for p in problems)
    # Without a CA to mount, the names are the user's.
    assert template_clashes(doc["spec"], {"url": BUS["url"]}) == []
    assert template_clashes(copy.deepcopy(doc["spec"]), {}) == []


def test_a_resumed_trials_pod_is_told_its_next_rung_and_the_step_its_checkpoint_is_from():
    events = [{"event": "assign", "budget": 1}, {"event": "pause", "step": 1},
              {"event": "resume", "budget": 3, "from_step": 1}, {"event": "pause", "step": 3},
              {"event": "resume", "budget": 9, "from_step": 3}]
    env = env_of(pod_for(experiment_doc(), {}, {"state": "Pending", "events": events})["spec"]["containers"][0])
    assert (env["KUBETUNE_BUDGET"], env["KUBETUNE_RESUME_STEP"]) == ("9", "3")
    first = env_of(pod_for(experiment_doc(), {}, {"state": "Pending", "events": events[:1]})["spec"]["containers"][0])
    assert first["KUBETUNE_BUDGET"] == "1" and "KUBETUNE_RESUME_STEP" not in first


def test_a_failed_trials_last_log_lines_are_its_termination_message_unless_the_template_says_otherwise():
    assert pod_for(experiment_doc(), {})["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    doc = experiment_doc()
    doc["spec"]["trialTemplate"]["podSpec"] = {"containers": [{"name": "trial", "terminationMessagePolicy": "File"}]}
    assert pod_for(doc, {})["spec"]["containers"][0]["terminationMessagePolicy"] == "File"
