"""How the test kubelet reads pod specs (no cluster needed)."""
from fractions import Fraction

import pytest

from tests.cluster.podspec import (ConfigError, MountError, command_line, container_env, expand,
                                   map_mounted_paths, pod_requests, secret_volumes, shortfall, tolerates)
from tests.cluster.quantity import parse_quantity


def test_quantities():
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("2Gi") == 2 * 2**30
    assert parse_quantity("1e3") == 1000
    assert parse_quantity("1.5") == Fraction(3, 2)
    assert parse_quantity(4) == 4


def test_requests_default_to_limits_and_add_up():
    pod = {"spec": {"containers": [
        {"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "2"},
                                    "requests": {"cpu": "500m"}}},
        {"name": "b", "resources": {"requests": {"memory": "1Gi"}}}]}}
    assert pod_requests(pod) == {"nvidia.com/gpu": 1, "cpu": Fraction(1, 2),
                                 "memory": 2**30, "pods": 1}
    assert shortfall(pod_requests(pod), {"nvidia.com/gpu": 2}, {"nvidia.com/gpu": 2, "cpu": 8,
                                                                 "memory": 2**40, "pods": 10}) \
        == ["nvidia.com/gpu"]


def test_expansion_like_kubernetes():
    env = {"A": "x"}
    assert expand("$(A)-$(B)-$$(A)", env) == "x-$(B)-$(A)"
    assert command_line({"name": "c", "command": ["echo"], "args": ["$(A)"]}, env) == ["echo", "x"]
    with pytest.raises(ConfigError):
        command_line({"name": "c"}, env)


def test_environment_sources_and_precedence():
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "t"}},
           "spec": {"nodeName": "n"}}
    data = {("configmap", "cm"): {"LR": "0.1", "X": "from-cm"}, ("secret", "s"): {"KEY": "k"}}
    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "cm"}}],
                 "env": [{"name": "X", "value": "$(LR)!"},
                         {"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "KEY"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {
                             "fieldPath": "metadata.labels['app']"}}},
                         {"name": "OPT", "valueFrom": {"configMapKeyRef": {
                             "name": "gone", "key": "k", "optional": True}}}]}
    env = container_env(pod, container, lambda kind, ns, name: data.get((kind, name)))
    assert env == {"LR": "0.1", "X": "0.1!", "K": "k", "APP": "t"}
    container["env"].append({"name": "M", "valueFrom": {"secretKeyRef": {"name": "nope",
                                                                          "key": "k"}}})
    with pytest.raises(ConfigError):
        container_env(pod, container, lambda kind, ns, name: data.get((kind, name)))


def test_taints_need_tolerations():
    taint = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}
    assert not tolerates({"spec": {}}, [taint])
    assert tolerates({"spec": {"tolerations": [{"operator": "Exists"}]}}, [taint])
    assert tolerates({"spec": {}}, [{"key": "k", "effect": "PreferNoSchedule"}])


def test_secret_volumes_give_the_mounted_secrets_files_and_a_missing_one_says_why():
    pod = {"metadata": {"name": "p", "namespace": "ns"},
           "spec": {"volumes": [{"name": "ca", "secret": {"secretName": "redis-ca",
                                                          "items": [{"key": "ca.crt", "path": "ca.pem"}]}},
                                {"name": "all", "secret": {"secretName": "creds"}},
                                {"name": "scratch", "emptyDir": {}},
                                {"name": "maybe", "secret": {"secretName": "gone", "optional": True}}]}}
    container = {"name": "c", "volumeMounts": [
        {"name": "ca", "mountPath": "/var/run/ca/", "readOnly": True}, {"name": "all", "mountPath": "/etc/creds"},
        {"name": "scratch", "mountPath": "/tmp/x"}, {"name": "maybe", "mountPath": "/opt/maybe"}]}
    data = {"redis-ca": {"ca.crt": "PEM", "other": "o"}, "creds": {"user": "u", "password": "p"}}
    fetch = lambda kind, ns, name: data.get(name) if (kind, ns) == ("secret", "ns") else None  # noqa: E731
    assert secret_volumes(pod, container, fetch) == {
        "/var/run/ca": {"ca.pem": "PEM"}, "/etc/creds": {"user": "u", "password": "p"}, "/opt/maybe": {}}
    del data["redis-ca"]
    with pytest.raises(MountError, match='volume "ca" : secret "redis-ca" not found') as err:
        secret_volumes(pod, container, fetch)
    assert err.value.reason == "ContainerCreating"
    data["redis-ca"] = {"other": "o"}
    with pytest.raises(MountError, match="non-existent secret key: ca.crt"):
        secret_volumes(pod, container, fetch)
    assert secret_volumes(pod, {"name": "c"}, fetch) == {}  # only what the container mounts


def test_paths_under_a_mount_are_mapped_to_the_pods_folder_in_values_and_flags():
    folders = {"/var/run/ca": "/scratch/pod/volumes/var_run_ca", "/var/run": "/scratch/pod/volumes/var_run"}
    assert map_mounted_paths("/var/run/ca/ca.crt", folders) == "/scratch/pod/volumes/var_run_ca/ca.crt"
    assert map_mounted_paths("/var/run/ca", folders) == "/scratch/pod/volumes/var_run_ca"
    assert map_mounted_paths("--ca=/var/run/ca/x", folders) == "--ca=/scratch/pod/volumes/var_run_ca/x"
    assert map_mounted_paths("/var/run/other", folders) == "/scratch/pod/volumes/var_run/other"
    for untouched in ("/var/running", "x/var/run/ca/ca.crt", "rediss://h:1/0", ""):
        assert map_mounted_paths(untouched, folders) == untouched
    assert map_mounted_paths("/var/run/ca/ca.crt", {}) == "/var/run/ca/ca.crt"
