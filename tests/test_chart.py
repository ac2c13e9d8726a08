"""The Helm chart: lint, render, server-side dry run, and least-privilege RBAC checked for real."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.chart import CHART, NAMESPACE, OPERATOR_SA, SUGGESTION_SA, helm, render
from tests.cluster.rest import ApiError


def test_helm_lint_passes():
    out = helm("lint", str(CHART), "--strict")
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_values_schema_refuses_bad_values():
    with pytest.raises(subprocess.CalledProcessError) as err:
        helm("template", "kt", str(CHART), "--set", "rbac.scope=everywhere")
    assert "rbac" in err.value.stderr and "scope" in err.value.stderr


EXTERNAL_TLS = ["redis.enabled=false", "redis.url=rediss://redis.example:6380/0", "redis.tls.caSecret=in-house-ca"]


@pytest.mark.parametrize("values", [[], ["rbac.scope=namespace"], ["redis.enabled=false", "redis.url=redis://r:6379/0"],
                                    EXTERNAL_TLS],
                         ids=["cluster", "namespaced", "external-redis", "external-redis-private-ca"])
def test_rendered_chart_passes_a_server_side_dry_run(k8s_cluster, chart, values):
    docs = render(*values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "NetworkPolicy", "Secret"} <= kinds
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert deployments == {"kt-kubetune-operator", "kt-kubetune-suggestion"}  # one suggestion service, not one per experiment
    result = k8s_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert result.returncode == 0, result.stderr


def deployment(docs: list[dict], component: str) -> tuple[dict, dict]:
    """The component's pod spec and its one container."""
    [d] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"kt-kubetune-{component}"]
    pod = d["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


@pytest.mark.parametrize("key", [None, "tls.crt"])
def test_a_private_ca_of_an_external_redis_reaches_the_service_and_through_the_operator_the_trials(key):
    docs = render(*EXTERNAL_TLS, *([f"redis.tls.caKey={key}"] if key else []))
    key = key or "ca.crt"
    pod, container = deployment(docs, "suggestion")
    assert pod["volumes"] == [{"name": "redis-ca",
                               "secret": {"secretName": "in-house-ca", "items": [{"key": key, "path": key}]}}]
    assert container["volumeMounts"] == [{"name": "redis-ca", "mountPath": "/var/run/kubetune/redis-ca",
                                          "readOnly": True}]
    env = env_of(container)
    assert env["KUBETUNE_REDIS_CA_FILE"] == f"/var/run/kubetune/redis-ca/{key}"
    assert env["KUBETUNE_REDIS_URL"] == "rediss://redis.example:6380/0"
    # The operator never connects to Redis: it is told the Secret, to mount in every trial pod.
    pod, container = deployment(docs, "operator")
    assert env_of(container)["KUBETUNE_REDIS_CA_SECRET"] == f"in-house-ca:{key}"
    assert "volumes" not in pod and "volumeMounts" not in container


@pytest.mark.parametrize("values", [[], ["redis.enabled=false", "redis.url=rediss://redis.example:6380/0"]],
                         ids=["in-release-redis", "external-redis-public-ca"])
def test_without_a_ca_secret_nothing_of_it_is_rendered(values):
    docs = render(*values)
    for component in ("suggestion", "operator"):
        pod, container = deployment(docs, component)
        assert "volumes" not in pod and "volumeMounts" not in container
        assert not {"KUBETUNE_REDIS_CA_FILE", "KUBETUNE_REDIS_CA_SECRET"} & set(env_of(container))


@pytest.mark.parametrize("values,message", [
    (["redis.tls.caSecret=ca"], "redis.tls.caSecret is for an external Redis"),
    (["redis.enabled=false", "redis.url=redis://r:6379/0", "redis.tls.caSecret=ca"], "needs a TLS redis.url (rediss://"),
    ([*EXTERNAL_TLS, "redis.tls.caKey=../ca"], "caKey")], ids=["in-release-redis", "plain-url", "bad-key"])
def test_a_ca_secret_that_cannot_work_is_refused(values, message):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(*values)
    assert message in err.value.stderr


def can_i(cluster, account, verb, resource, namespace):
    who = f"system:serviceaccount:{NAMESPACE}:{account}"
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    result = cluster.kubectl("auth", "can-i", verb, resource, *extra, "--as", who, "-n", namespace, check=False)
    return result.stdout.strip() == "yes"


def test_operator_account_can_do_its_work_and_nothing_more(k8s_cluster, chart, k8s_namespace):
    for verb, resource in [("create", "pods"), ("delete", "pods"), ("watch", "pods"), ("create", "trials.kubetune.io"),
                           ("patch", "experiments.kubetune.io/status"), ("patch", "trials.kubetune.io/status"),
                           ("create", "events")]:
        assert can_i(k8s_cluster, OPERATOR_SA, verb, resource, k8s_namespace), f"operator cannot {verb} {resource}"
    for verb, resource, namespace in [("get", "secrets", k8s_namespace), ("list", "secrets", "default"),
                                      ("get", "secrets", NAMESPACE), ("create", "deployments", k8s_namespace),
                                      ("delete", "nodes", k8s_namespace), ("create", "pods/exec", k8s_namespace)]:
        assert not can_i(k8s_cluster, OPERATOR_SA, verb, resource, namespace), f"operator may {verb} {resource}"


def test_suggestion_account_only_reads_trials_and_writes_their_status(k8s_cluster, chart, k8s_namespace):
    assert can_i(k8s_cluster, SUGGESTION_SA, "patch", "trials.kubetune.io/status", k8s_namespace)
    assert can_i(k8s_cluster, SUGGESTION_SA, "list", "trials.kubetune.io", k8s_namespace)
    for verb, resource in [("create", "pods"), ("patch", "trials.kubetune.io"), ("delete", "trials.kubetune.io"),
                           ("get", "secrets"), ("patch", "experiments.kubetune.io/status")]:
        assert not can_i(k8s_cluster, SUGGESTION_SA, verb, resource, k8s_namespace)


def test_a_real_request_with_the_operator_token_is_refused_secrets(k8s_cluster, chart, k8s_namespace):
    token = k8s_cluster.service_account_token(NAMESPACE, OPERATOR_SA, create=False)
    api = k8s_cluster.rest(token=token)
    api.get(f"/apis/kubetune.io/v1alpha1/namespaces/{k8s_namespace}/trials")
    with pytest.raises(ApiError) as err:
        api.get(f"/api/v1/namespaces/{k8s_namespace}/secrets")
    assert err.value.status == 403
