"""A full GPU node leaves pods Pending until GPUs free up."""
import pytest

from tests.cluster.helpers import manifest, phases, python_pod
from tests.cluster.waiting import wait_until

# Each trial holds its GPU until the test creates its release file.
HOLD_GPU = """
import os, time
print('training on GPU', flush=True)
while not os.path.exists(os.environ['RELEASE']):
    time.sleep(0.05)
"""


@pytest.mark.test_kubelet(gpus=2)
def test_two_gpus_run_two_of_four_trials_at_a_time(k8s_cluster, k8s_namespace, test_kubelet,
                                                    tmp_path):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    release = {f"trial-{i}": tmp_path / f"release-{i}" for i in range(4)}
    pods = [python_pod(name, HOLD_GPU, gpus=1, env=[{"name": "RELEASE", "value": str(path)}])
            for name, path in release.items()]
    # One at a time so "first" is well defined (binding goes by creation time).
    for pod in pods:
        k8s_cluster.kubectl("create", "-n", ns, "-f", "-", input=manifest(pod))

    def running_and_pending() -> dict | None:
        now = phases(admin, ns)
        counts = {phase: sorted(n for n, p in now.items() if p == phase)
                  for phase in ("Running", "Pending")}
        return counts if len(counts["Running"]) == 2 and len(counts["Pending"]) == 2 else None

    first = wait_until(running_and_pending, 30, "2 trials Running and 2 Pending")
    assert first["Running"] == ["trial-0", "trial-1"]
    assert len(test_kubelet.running_pods()) == 2
    # The waiting ones say why, as kube-scheduler would.
    for name in first["Pending"]:
        pod = admin.get(f"/api/v1/namespaces/{ns}/pods/{name}")
        assert "nodeName" not in pod["spec"]
        condition = wait_until(lambda: [c for c in admin.get(
            f"/api/v1/namespaces/{ns}/pods/{name}")["status"].get("conditions", [])
            if c["type"] == "PodScheduled" and c["status"] == "False"], 10, "Unschedulable")
        assert "Insufficient nvidia.com/gpu" in condition[0]["message"]

    # Having been judged unschedulable, they are still Pending and unbound.
    assert [phases(admin, ns)[n] for n in first["Pending"]] == ["Pending", "Pending"]
    assert len(test_kubelet.running_pods()) == 2

    for name in first["Running"]:
        release[name].touch()
    wait_until(lambda: all(phases(admin, ns)[n] == "Succeeded" for n in first["Running"]), 30,
               "the first two trials to finish")
    wait_until(lambda: all(phases(admin, ns)[n] == "Running" for n in first["Pending"]), 30,
               "the waiting trials to start on the freed GPUs")

    for name in first["Pending"]:
        release[name].touch()
    wait_until(lambda: set(phases(admin, ns).values()) == {"Succeeded"}, 30, "all to finish")
