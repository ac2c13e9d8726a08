"""The test kubelet's pod termination and node heartbeats behave like a kubelet's."""
import pytest

from tests.cluster.helpers import get_pod, manifest, python_pod
from tests.cluster.rest import ApiError
from tests.cluster.waiting import wait_until

ON_SIGTERM_WRITE = """
import os, signal, sys, time
def stop(*_):
    open(os.environ['MARKER'], 'w').write('got SIGTERM')
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print('ready', flush=True)
while True:
    time.sleep(0.1)
"""

IGNORE_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print('ready', flush=True)
while True:
    time.sleep(0.1)
"""


def deleted(api, ns, name) -> bool:
    try:
        get_pod(api, ns, name)
    except ApiError as error:
        return error.status == 404
    return False


def test_pod_deletion_sends_sigterm_then_sigkill(k8s_cluster, k8s_namespace, test_kubelet,
                                                 tmp_path):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    marker = tmp_path / "terminated"
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        python_pod("polite", ON_SIGTERM_WRITE, env=[{"name": "MARKER", "value": str(marker)}]),
        python_pod("stubborn", IGNORE_SIGTERM, grace_seconds=2)))
    for name in ("polite", "stubborn"):
        wait_until(lambda: "ready" in test_kubelet.log_path(ns, name).read_text(), 30,
                   f"{name} to start")
    stubborn = test_kubelet.run_of(ns, "stubborn").process

    k8s_cluster.kubectl("delete", "-n", ns, "pod/polite", "pod/stubborn", "--wait=false")
    wait_until(lambda: deleted(admin, ns, "polite"), 30, "polite to be deleted")
    assert marker.read_text() == "got SIGTERM"
    wait_until(lambda: deleted(admin, ns, "stubborn"), 30, "stubborn to be deleted")
    assert stubborn.returncode == -9  # SIGKILL once its 2 s grace period was over
    assert test_kubelet.running_pods() == []


@pytest.mark.test_kubelet(gpus=1)
def test_lost_node_goes_not_ready_and_its_processes_die(k8s_cluster, k8s_namespace,
                                                        test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    lease = admin.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/"
                      f"{test_kubelet.name}")
    assert lease["spec"]["holderIdentity"] == test_kubelet.name
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        python_pod("trial", "import time\nwhile True: time.sleep(1)", gpus=1)))
    wait_until(lambda: test_kubelet.running_pods(), 30, "the trial to run")
    process = test_kubelet.run_of(ns, "trial").process

    test_kubelet.lose()
    assert process.poll() is not None

    def ready_status() -> str:
        node = admin.get(f"/api/v1/nodes/{test_kubelet.name}")
        return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")

    # The controller-manager's node lifecycle controller notices the silence
    # (grace period 8 s here) and marks the node unknown and unreachable.
    wait_until(lambda: ready_status() == "Unknown", 40, "the node to be marked Unknown")
    node = admin.get(f"/api/v1/nodes/{test_kubelet.name}")
    taints = {t["key"] for t in node["spec"].get("taints", [])}
    assert "node.kubernetes.io/unreachable" in taints
