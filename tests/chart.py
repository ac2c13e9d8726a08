"""The Helm chart on the test cluster: CRDs and RBAC applied for real, the rest checked by the server.

Deployments and the Redis StatefulSet cannot run here (no container runtime),
so the operator and the suggestion service run as local processes — but with
the chart's own ServiceAccounts and RBAC, through tokens issued for those
accounts, so a permission the chart forgot fails the tests.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster.tools import tool

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kubetune"
RELEASE, NAMESPACE = "kt", "kubetune"
OPERATOR_SA = f"{RELEASE}-kubetune-operator"
SUGGESTION_SA = f"{RELEASE}-kubetune-suggestion"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def helm(*args: str) -> str:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=True).stdout


def render(*values: str) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for v in values:
        args += ["--set", v]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


@pytest.fixture(scope="session")
def chart(k8s_cluster):
    """The chart's CRDs and RBAC installed; returns a function giving a kubeconfig for one of its accounts."""
    k8s_cluster.kubectl("apply", "-f", str(CHART / "crds"))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/experiments.kubetune.io",
                        "crd/trials.kubetune.io")
    k8s_cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    rbac = [d for d in render() if d["kind"] in RBAC_KINDS]
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))

    def kubeconfig(account: str) -> Path:
        token = k8s_cluster.service_account_token(NAMESPACE, account, create=False)
        return k8s_cluster.write_kubeconfig(k8s_cluster.workdir / f"{account}.kubeconfig", account, token=token)

    return kubeconfig
