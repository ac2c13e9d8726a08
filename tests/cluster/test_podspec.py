"""How the test kubelet reads pod specs (no cluster needed)."""
from fractions import Fraction

import pytest

from tests.cluster.podspec import (ConfigError, command_line, container_env, expand,
                                   pod_requests, shortfall, tolerates)
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
