"""Owner references are honoured: deleting an owner deletes what it owns."""
from tests.cluster.helpers import manifest, python_pod
from tests.cluster.rest import ApiError
from tests.cluster.waiting import wait_until


def gone(api, path: str) -> bool:
    try:
        api.get(path)
    except ApiError as error:
        return error.status == 404
    return False


def test_deleting_an_owner_deletes_its_children(k8s_cluster, k8s_namespace):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    owner = admin.post(f"/api/v1/namespaces/{ns}/configmaps",
                       {"metadata": {"name": "experiment"}, "data": {}})
    admin.post(f"/api/v1/namespaces/{ns}/configmaps", {
        "metadata": {"name": "trial-1", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "experiment",
            "uid": owner["metadata"]["uid"]}]},
        "data": {"lr": "0.1"}})
    admin.delete(f"/api/v1/namespaces/{ns}/configmaps/experiment")
    wait_until(lambda: gone(admin, f"/api/v1/namespaces/{ns}/configmaps/trial-1"), 30,
               "the garbage collector to delete the owned ConfigMap")


def test_deleting_a_deployment_stops_its_processes(k8s_cluster, k8s_namespace, test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    pod = python_pod("x", "import time\nwhile True: time.sleep(1)", restart_policy="Always")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleeper"},
                  "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "sleeper"}},
                           "template": {"metadata": {"labels": {"app": "sleeper"}},
                                        "spec": pod["spec"]}}}
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(deployment))
    k8s_cluster.kubectl("rollout", "status", "-n", ns, "deployment/sleeper", "--timeout=60s")
    wait_until(lambda: len(test_kubelet.running_pods()) == 2, 30, "two processes")

    # Background propagation (kubectl's default): the garbage collector removes the
    # ReplicaSet, then its pods; the kubelet stops their processes.
    k8s_cluster.kubectl("delete", "-n", ns, "deployment/sleeper", "--wait=false")
    wait_until(lambda: not admin.get(f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"], 30,
               "the ReplicaSet to be garbage-collected")
    wait_until(lambda: not admin.get(f"/api/v1/namespaces/{ns}/pods")["items"], 60,
               "the pods to be deleted")
    assert test_kubelet.running_pods() == []
