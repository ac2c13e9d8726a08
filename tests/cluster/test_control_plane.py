"""The control plane itself: versions, readiness, helm. (Its start time is measured by bench/operator.py
and printed in the test session's header, not asserted: a timed test fails on a loaded machine.)"""
import json
import subprocess

from tests.cluster.tools import pinned_versions, tool


def test_kubectl_and_server_are_the_pinned_release(k8s_cluster):
    version = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    expected = pinned_versions()["KUBERNETES_VERSION"]
    assert version["clientVersion"]["gitVersion"] == expected
    assert version["serverVersion"]["gitVersion"] == expected
    assert k8s_cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_helm_installs_a_chart(k8s_cluster, k8s_namespace, tmp_path):
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: hello\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: '{{ .Release.Name }}-settings'}\n"
        "data: {greeting: '{{ .Values.greeting }}'}\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    subprocess.run([tool("helm"), "install", "demo", str(chart), "--namespace", k8s_namespace,
                    "--kubeconfig", str(k8s_cluster.kubeconfig), "--set", "greeting=hi",
                    "--wait", "--timeout", "60s"], check=True, capture_output=True, text=True)
    data = k8s_cluster.rest().get(f"/api/v1/namespaces/{k8s_namespace}/configmaps/demo-settings")
    assert data["data"] == {"greeting": "hi"}
