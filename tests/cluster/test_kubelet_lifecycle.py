"""The test kubelet's pod termination and node heartbeats behave like a kubelet's."""
import sys

from tests.cluster.helpers import get_pod, manifest, python_pod, wait_for_phase
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


def test_lost_node_goes_not_ready_and_its_trial_is_evicted(k8s_cluster, k8s_namespace,
                                                           make_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    # Two nodes: if every node of a zone goes silent, the node lifecycle controller
    # suspects its own connectivity and evicts nothing (as in a real cluster).
    make_kubelet(gpus=1)
    doomed = make_kubelet(gpus=1)
    lease = admin.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/"
                      f"{doomed.name}")
    assert lease["spec"]["holderIdentity"] == doomed.name
    trial = python_pod("trial", "import time\nwhile True: time.sleep(1)", gpus=1)
    trial["spec"]["nodeSelector"] = {"kubernetes.io/hostname": doomed.name}
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(trial))
    wait_until(lambda: doomed.running_pods(), 30, "the trial to run")
    process = doomed.run_of(ns, "trial").process

    doomed.lose()
    assert process.poll() is not None

    def ready_status() -> str:
        node = admin.get(f"/api/v1/nodes/{doomed.name}")
        return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")

    # The controller-manager's node lifecycle controller notices the silence
    # (grace period 8 s here), marks the node Unknown and taints it unreachable.
    wait_until(lambda: ready_status() == "Unknown", 40, "the node to be marked Unknown")
    # Once the trial's toleration of that taint runs out (10 s in the test cluster),
    # it is evicted; with no kubelet to confirm, it then stays Terminating.
    evicted = wait_until(lambda: (p := get_pod(admin, ns, "trial"))["metadata"].get(
        "deletionTimestamp") and p, 60, "the trial to be evicted")
    assert any(c["type"] == "DisruptionTarget" for c in evicted["status"]["conditions"])
    node = admin.get(f"/api/v1/nodes/{doomed.name}")
    assert {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"} in [
        {"key": t["key"], "effect": t["effect"]} for t in node["spec"]["taints"]]


FOREVER = "import time\nprint('shipping', flush=True)\nwhile True:\n    time.sleep(0.1)"


def with_container(pod: dict, name: str, code: str, *, native: bool = False) -> dict:
    """pod with one more container running code: a regular one, or a native sidecar (an init container
    with restartPolicy Always)."""
    container = {**pod["spec"]["containers"][0], "name": name, "command": [sys.executable, "-u", "-c", code]}
    if native:
        pod["spec"].setdefault("initContainers", []).append({**container, "restartPolicy": "Always"})
    else:
        pod["spec"]["containers"].append(container)
    return pod


def states(pod: dict, key: str = "containerStatuses") -> dict[str, dict]:
    return {c["name"]: c["state"] for c in pod["status"].get(key) or []}


def test_every_container_runs_and_the_pod_runs_on_while_a_sidecar_does(k8s_cluster, k8s_namespace,
                                                                       test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        with_container(python_pod("sidecar", "print('trained')"), "shipper", FOREVER)))
    pod = wait_until(lambda: "terminated" in states(p := get_pod(admin, ns, "sidecar")).get("main", {}) and p,
                     30, "the main container to exit")
    assert pod["status"]["phase"] == "Running"
    assert states(pod)["main"]["terminated"]["exitCode"] == 0 and "running" in states(pod)["shipper"]
    assert "trained" in k8s_cluster.kubectl("logs", "-n", ns, "sidecar", "-c", "main").stdout
    assert "shipping" in k8s_cluster.kubectl("logs", "-n", ns, "sidecar", "-c", "shipper").stdout
    shipper = test_kubelet.run_of(ns, "sidecar", "shipper").process
    assert test_kubelet.run_of(ns, "sidecar").container == "main"

    k8s_cluster.kubectl("delete", "-n", ns, "pod/sidecar", "--wait=false")
    wait_until(lambda: deleted(admin, ns, "sidecar"), 30, "the pod to be deleted")
    assert shipper.poll() is not None  # stopped with its pod
    assert test_kubelet.running_pods() == []


def test_a_pod_succeeds_once_all_its_containers_exit_0_and_fails_if_any_fails(k8s_cluster, k8s_namespace,
                                                                              test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    late = "import sys, time\ntime.sleep(1)\nsys.exit({})"
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        with_container(python_pod("all-ok", "pass"), "other", late.format(0)),
        with_container(python_pod("one-failed", "pass"), "other", late.format(3))))
    ok = wait_for_phase(admin, ns, "all-ok", "Succeeded")
    assert {n: s["terminated"]["exitCode"] for n, s in states(ok).items()} == {"main": 0, "other": 0}
    failed = wait_for_phase(admin, ns, "one-failed", "Failed")
    assert {n: s["terminated"]["exitCode"] for n, s in states(failed).items()} == {"main": 0, "other": 3}


def test_native_sidecars_are_stopped_once_the_regular_containers_are_over(k8s_cluster, k8s_namespace,
                                                                          test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        with_container(python_pod("native", "import time\ntime.sleep(1)"), "proxy", FOREVER, native=True)))
    pod = wait_for_phase(admin, ns, "native", "Succeeded")
    assert states(pod)["main"]["terminated"]["exitCode"] == 0
    assert "terminated" in states(pod, "initContainerStatuses")["proxy"]  # (its exit code does not count)
    assert "shipping" in k8s_cluster.kubectl("logs", "-n", ns, "native", "-c", "proxy").stdout
    assert test_kubelet.running_pods() == []
