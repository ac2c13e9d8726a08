"""Workloads really run: Deployment -> ReplicaSet -> Pod -> a local process."""
import sys

from tests.cluster.helpers import get_pod, manifest, python_pod, terminated_state, wait_for_phase
from tests.cluster.waiting import wait_until

TRAINER = """
import os, time
print(f"hello from {os.environ['POD_NAME']} lr={os.environ['LR']} key={os.environ['API_KEY']}")
print(f"cwd={os.getcwd()}")
while True:
    time.sleep(1)
"""


def test_deployment_pod_runs_its_command(k8s_cluster, k8s_namespace, test_kubelet):
    ns, kubectl = k8s_namespace, k8s_cluster.kubectl
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                "data": {"LR": "0.01"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
              "stringData": {"key": "s3cret"}}
    container = {"name": "trainer", "image": "kubetune/trial:test",
                 "command": [sys.executable, "-u", "-c", TRAINER],
                 "envFrom": [{"configMapRef": {"name": "settings"}}],
                 "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {
                             "fieldPath": "metadata.name"}}},
                         {"name": "API_KEY", "valueFrom": {"secretKeyRef": {
                             "name": "creds", "key": "key"}}}]}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "trainer"},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "trainer"}},
                           "template": {"metadata": {"labels": {"app": "trainer"}},
                                        "spec": {"containers": [container]}}}}
    kubectl("apply", "-n", ns, "-f", "-", input=manifest(settings, secret, deployment))

    admin = k8s_cluster.rest()
    # The controller-manager's deployment controller makes a ReplicaSet, whose
    # controller makes the Pod; the test kubelet binds and runs it.
    replica_sets = wait_until(lambda: admin.get(
        f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"], 30, "the ReplicaSet")
    assert replica_sets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    pods = wait_until(lambda: admin.get(f"/api/v1/namespaces/{ns}/pods",
                                        labelSelector="app=trainer")["items"], 30, "the Pod")
    name = pods[0]["metadata"]["name"]
    pod = wait_for_phase(admin, ns, name, "Running")
    assert pod["spec"]["nodeName"] == test_kubelet.name
    assert pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    kubectl("rollout", "status", "-n", ns, "deployment/trainer", "--timeout=60s")

    expected = f"hello from {name} lr=0.01 key=s3cret"
    wait_until(lambda: expected in test_kubelet.log_path(ns, name).read_text(), 30,
               "the trainer's output in its log file")
    logs = kubectl("logs", "-n", ns, "deployment/trainer").stdout
    assert expected in logs
    # It runs in its own scratch directory, not the test's.
    assert f"cwd={test_kubelet.workdir}" in logs


def test_job_like_pods_succeed_and_fail_with_exit_codes(k8s_cluster, k8s_namespace,
                                                        test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        python_pod("ok", "print('epoch=1 val_accuracy=0.91')"),
        python_pod("broken", "import sys; print('diverged'); sys.exit(3)")))

    ok = wait_for_phase(admin, ns, "ok", "Succeeded")
    assert terminated_state(ok)["exitCode"] == 0
    assert terminated_state(ok)["reason"] == "Completed"
    assert "epoch=1 val_accuracy=0.91" in k8s_cluster.kubectl("logs", "-n", ns, "ok").stdout

    broken = wait_for_phase(admin, ns, "broken", "Failed")
    assert terminated_state(broken)["exitCode"] == 3
    assert "diverged" in test_kubelet.log_path(ns, "broken").read_text()


def test_logs_follow_a_running_pod(k8s_cluster, k8s_namespace, test_kubelet):
    ns = k8s_namespace
    slow = "import time\nfor epoch in range(3):\n    print(f'epoch={epoch}', flush=True)\n" \
           "    time.sleep(0.5)"
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(python_pod("slow", slow)))
    wait_for_phase(k8s_cluster.rest(), ns, "slow", "Running")
    # -f returns only when the container has exited and its output is all sent.
    followed = k8s_cluster.kubectl("logs", "-f", "-n", ns, "slow").stdout
    assert followed.split() == ["epoch=0", "epoch=1", "epoch=2"]


def test_missing_command_fails_the_pod(k8s_cluster, k8s_namespace, test_kubelet):
    ns = k8s_namespace
    pod = python_pod("nope", "")
    pod["spec"]["containers"][0]["command"] = ["/nonexistent/trainer"]
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(pod))
    failed = wait_for_phase(k8s_cluster.rest(), ns, "nope", "Failed")
    assert terminated_state(failed)["reason"] == "StartError"
    assert terminated_state(failed)["exitCode"] == 128


def test_job_completes(k8s_cluster, k8s_namespace, test_kubelet):
    ns = k8s_namespace
    template = python_pod("unused", "print('trial done')")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "trial"},
           "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}}}
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(job))
    k8s_cluster.kubectl("wait", "-n", ns, "job/trial", "--for=condition=Complete",
                        "--timeout=60s")
    assert "trial done" in k8s_cluster.kubectl("logs", "-n", ns, "job/trial").stdout


def test_always_restart_policy_restarts_the_process(k8s_cluster, k8s_namespace, test_kubelet):
    ns, admin = k8s_namespace, k8s_cluster.rest()
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(
        python_pod("flaky", "import sys; print('crash'); sys.exit(1)", restart_policy="Always")))
    pod = wait_until(lambda: (p := get_pod(admin, ns, "flaky"))["status"].get(
        "containerStatuses", [{}])[0].get("restartCount", 0) >= 1 and p, 30, "a restart")
    assert pod["status"]["phase"] == "Running"
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 1
    assert "crash" in k8s_cluster.kubectl("logs", "-n", ns, "flaky", "--previous").stdout


READ_MOUNTED = """
import os, sys
path = os.environ['CA_FILE']
print(f"ca={open(path).read()} arg={open(sys.argv[1].partition('=')[2]).read()} mode={os.stat(path).st_mode & 0o777:o}")
"""


def test_a_secret_volume_is_mounted_once_its_secret_exists(k8s_cluster, k8s_namespace, test_kubelet):
    """A mounted Secret's keys are files the process finds at the paths its env and args name under the
    mountPath; without the Secret the pod waits ContainerCreating, saying which one is missing."""
    ns, admin = k8s_namespace, k8s_cluster.rest()
    pod = python_pod("reader", READ_MOUNTED, env=[{"name": "CA_FILE", "value": "/var/run/ca/ca.crt"}])
    container = pod["spec"]["containers"][0]
    container["command"].append("--other=/var/run/ca/other")
    container["volumeMounts"] = [{"name": "ca", "mountPath": "/var/run/ca", "readOnly": True}]
    pod["spec"]["volumes"] = [{"name": "ca", "secret": {"secretName": "redis-ca"}}]
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(pod))

    def waiting():
        state = (get_pod(admin, ns, "reader")["status"].get("containerStatuses") or [{}])[0].get("state", {})
        return state.get("waiting", {}).get("message") and state["waiting"]
    waiting_state = wait_until(waiting, 30, "the pod to wait for its Secret")
    assert waiting_state == {"reason": "ContainerCreating",
                             "message": 'MountVolume.SetUp failed for volume "ca" : secret "redis-ca" not found'}
    assert get_pod(admin, ns, "reader")["status"]["phase"] == "Pending"
    assert test_kubelet.running_pods() == []

    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-ca"},
              "stringData": {"ca.crt": "PEM", "other": "more"}}
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest(secret))
    wait_for_phase(admin, ns, "reader", "Succeeded")
    assert "ca=PEM arg=more mode=444" in test_kubelet.log_path(ns, "reader").read_text()
