"""A test kubelet: one simulated Node whose pods run as local processes.

It does, through the real API server, what a kubelet (and, for its own node, the
scheduler) does, knowing its pods from a watch:
- registers a Node with the given capacity (cpu, memory, nvidia.com/gpu, pods)
  and keeps it Ready: a Lease in kube-node-lease renewed every couple of seconds
  and the Ready condition's heartbeat;
- binds Pending pods that fit (sum of the requests of its non-terminated pods
  within allocatable; nodeSelector and taints respected) through pods/binding,
  and marks the rest Unschedulable, as a full GPU node leaves them;
- runs each container's command/args as a local process of its own in the pod's
  scratch directory with the container's environment (ConfigMaps and Secrets
  resolved), its output in a log file per container that `kubectl logs -c`
  reads through the API server. Native sidecars (initContainers with
  restartPolicy Always) run too, started first and stopped (SIGTERM, SIGKILL
  after the grace period) once every regular container has exited for good;
  other init containers are ignored;
- sets up the Secret volumes the container mounts (all other volumes are
  ignored): the Secret's keys (or its `items`) are written as read-only files
  in a folder of the pod's scratch directory. A local process cannot see them at
  the mountPath (/var/run/...; there is no mount namespace), so the kubelet maps
  instead: an env value or an argument that names a path at or under a mountPath
  (the whole value, or what follows an `=`) is rewritten to the same path under
  that folder. A path the process builds itself, or reads from a file, is not
  mapped: test-only, enough for "KUBETUNE_REDIS_CA_FILE=/var/run/.../ca.crt".
  A missing Secret or key leaves the pod ContainerCreating with the reason in
  its message, as a real kubelet does;
- gives each container a termination message file (its terminationMessagePath,
  /dev/termination-log by default, mapped as a mount is) and reports what the
  container wrote there as its termination message; with FallbackToLogsOnError
  and a failed exit, the end of its log when the file is empty;
- reports each container's state, restart count and exit code in pod status,
  restarting each per restartPolicy, and the phase as a kubelet does: Running
  while any container runs (or restarts), Succeeded once all have exited 0 for
  good, Failed once all have exited and any failed (a native sidecar's exit
  does not count);
- on pod deletion sends SIGTERM to every container, then SIGKILL after the
  grace period, and finishes the deletion; lose() makes the node vanish
  (heartbeats stop, processes die) for failure tests.

Identities: the node part uses a client certificate for system:node:<name> in
group system:nodes, so the Node authorizer and NodeRestriction admission confine
it as they confine a real kubelet; binding uses system:kube-scheduler, the
identity the bootstrap RBAC policy allows to bind pods.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.cluster import processes
from tests.cluster.control_plane import ControlPlane
from tests.cluster.log_server import LogServer
from tests.cluster.pod_status import (TERMINAL_PHASES, ContainerRun, PodRun, now, now_micro, pod_status,
                                      with_transition_times)
from tests.cluster.pod_watch import PodWatch
from tests.cluster.podspec import (GPU, ConfigError, command_line, container_env, map_mounted_paths,
                                   object_data, secret_volumes)
from tests.cluster.quantity import parse_quantity
from tests.cluster.rest import ApiError
from tests.cluster.scheduling import NodeBinder
from tests.cluster.waiting import GiveUp, wait_until

HOST_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
LEASE_DURATION_SECONDS = 40
# Pods are synced in parallel, as a kubelet's per-pod workers do: one thread doing every pod's API
# calls in turn made the test kubelet, not the system under test, the limit on pods per second.
POD_WORKERS = 8


class TestKubelet:
    __test__ = False  # not a pytest test class

    def __init__(self, cluster: ControlPlane, name: str = "test-node", *, cpu: str = "8",
                 memory: str = "32Gi", gpus: int = 0, max_pods: int = 110,
                 labels: dict[str, str] | None = None, heartbeat_seconds: float = 2.0,
                 sync_seconds: float = 0.2, extra_env: dict[str, str] | None = None):
        self.cluster = cluster
        self.name = name
        self.capacity = {"cpu": str(cpu), "memory": str(memory), GPU: str(gpus),
                         "pods": str(max_pods)}
        self.allocatable = {k: parse_quantity(v) for k, v in self.capacity.items()}
        self.labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", **(labels or {})}
        self.heartbeat_seconds = heartbeat_seconds
        self.sync_seconds = sync_seconds
        self.extra_env = dict(extra_env or {})
        self.workdir = cluster.workdir / "kubelets" / name
        self.errors: list[str] = []  # unexpected failures of a sync pass, for debugging
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._busy: set[str] = set()  # uids a pod worker is syncing now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.lost = False

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> "TestKubelet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        identity = {"user": f"system:node:{self.name}", "groups": ("system:nodes",)}
        self.node_api = self.cluster.rest(**identity)
        self.heartbeat_api = self.cluster.rest(**identity)
        self.binder = NodeBinder(self.name, self.allocatable, self.labels,
                                 scheduler_api=self.cluster.rest(user="system:kube-scheduler"),
                                 node_api=self.node_api)
        serving = self.cluster.ca.server(f"kubelet-{self.name}", self.name,
                                         ("127.0.0.1", self.name))
        self.log_server = LogServer(serving, self.cluster.ca.cert, self._find_log)
        self.log_server.start()
        self._register_node()
        self.pod_watch = PodWatch(self.cluster.rest(**identity),
                                  f"spec.nodeName={self.name}").start(f"kubelet-{self.name}-watch")
        self._workers = ThreadPoolExecutor(max_workers=POD_WORKERS, thread_name_prefix=f"kubelet-{self.name}-pod")
        for target, label in ((self._heartbeat_loop, "heartbeat"), (self._sync_loop, "sync")):
            thread = threading.Thread(target=target, name=f"kubelet-{self.name}-{label}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        wait_until(self._node_up_in_api, 30, f"node {self.name} Ready with its Lease")
        return self

    def stop(self, delete_node: bool = True) -> None:
        """Shut the kubelet down: its processes are terminated, its Node deleted."""
        self._halt(grace_seconds=5)
        if delete_node:
            try:
                self.cluster.rest().delete(f"/api/v1/nodes/{self.name}")
            except ApiError as error:
                if error.status != 404:
                    raise

    def lose(self) -> None:
        """The node vanishes: no more heartbeats or status, its processes die at once.
        The Node and its pods stay in the API, for the control plane to deal with."""
        self.lost = True
        self._halt(grace_seconds=0)

    def partition(self) -> None:
        """The node is cut off from the API server only: no more heartbeats or status, but its
        processes run on (and still reach other services, such as Redis), as on a real node until
        its kubelet reconnects and kills what the API no longer holds."""
        self.lost = True
        self._halt(grace_seconds=None)

    def _halt(self, grace_seconds: float | None) -> None:
        """Stops the kubelet's threads, and its processes unless grace_seconds is None."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        if getattr(self, "_workers", None):
            self._workers.shutdown(wait=True)
            self._workers = None
        if getattr(self, "pod_watch", None):
            self.pod_watch.stop()
            self.pod_watch = None
        if grace_seconds is None:
            return
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            for process in run.processes():
                processes.stop(process, grace_seconds=grace_seconds)
        if getattr(self, "log_server", None):
            self.log_server.stop()
            self.log_server = None

    def __enter__(self) -> "TestKubelet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- what tests look at ----------------------------------------------------------

    def pod_run_of(self, namespace: str, pod: str) -> PodRun | None:
        with self._lock:
            runs = [r for r in self._runs.values() if r.namespace == namespace and r.pod == pod]
        return runs[-1] if runs else None

    def run_of(self, namespace: str, pod: str, container: str | None = None) -> ContainerRun | None:
        """The run of the pod's container of that name (by default its first regular container)."""
        run = self.pod_run_of(namespace, pod)
        if run is None:
            return None
        return run.container(container) if container else run.regular[0]

    def log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """The current log file of the pod's container (waits until it has started)."""
        run = wait_until(lambda: self.run_of(namespace, pod, container), 60,
                         f"pod {namespace}/{pod} to start on {self.name}")
        return wait_until(lambda: run.log_path, 60, f"log of {namespace}/{pod}")

    def running_pods(self) -> list[str]:
        with self._lock:
            return sorted(f"{r.namespace}/{r.pod}" for r in self._runs.values() if r.running())

    # ----- node registration and heartbeats ---------------------------------------

    def _node_status(self) -> dict:
        stamp = now()
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHasSufficient{what}",
             "message": f"kubelet has sufficient {what.lower()}", "lastHeartbeatTime": stamp,
             "lastTransitionTime": stamp}
            for kind, what in (("MemoryPressure", "Memory"), ("DiskPressure", "Disk"),
                               ("PIDPressure", "PID"))
        ]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "test kubelet is posting ready status",
                           "lastHeartbeatTime": stamp, "lastTransitionTime": stamp})
        return {
            "capacity": self.capacity, "allocatable": self.capacity, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {"machineID": self.name, "systemUUID": self.name, "bootID": self.name,
                         "kernelVersion": os.uname().release, "osImage": "kubetune test kubelet",
                         "containerRuntimeVersion": "local-process://0",
                         "kubeletVersion": _kubernetes_version(), "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }

    def _register_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": self.labels},
                "status": self._node_status()}
        try:
            self.node_api.post("/api/v1/nodes", node)
        except ApiError as error:
            if error.status != 409:
                raise
        # Creation may drop or keep status fields; set them all explicitly.
        self.node_api.strategic_patch(f"/api/v1/nodes/{self.name}/status",
                                      {"status": self._node_status()})

    def _node_up_in_api(self) -> bool:
        if self.errors:
            raise GiveUp(f"test kubelet {self.name} failed:\n{self.errors[-1]}")
        admin = self.cluster.rest()
        node = admin.get(f"/api/v1/nodes/{self.name}")
        admin.get(f"{LEASES}/{self.name}")
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in node["status"].get("conditions", []))

    def _heartbeat_loop(self) -> None:
        status_every = max(1, int(10 / self.heartbeat_seconds))  # Ready heartbeat ~ 10 s
        beat = 0
        while not self._stop.is_set():
            try:
                self._renew_lease()
                if beat % status_every == 0:
                    self.heartbeat_api.strategic_patch(
                        f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()})
            except Exception:  # noqa: BLE001 - keep beating; the error is recorded
                self._record_error()
            beat += 1
            self._stop.wait(self.heartbeat_seconds)

    def _renew_lease(self) -> None:
        path = f"{LEASES}/{self.name}"
        try:
            lease = self.heartbeat_api.get(path)
        except ApiError as error:
            if error.status != 404:
                raise
            node = self.heartbeat_api.get(f"/api/v1/nodes/{self.name}")
            self.heartbeat_api.post(
                LEASES,
                {"metadata": {"name": self.name, "namespace": "kube-node-lease",
                              "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                                                   "name": self.name,
                                                   "uid": node["metadata"]["uid"]}]},
                 "spec": {"holderIdentity": self.name,
                          "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                          "renewTime": now_micro()}})
            return
        lease["spec"]["renewTime"] = now_micro()
        self.heartbeat_api.put(path, lease)

    # ----- the sync loop: bind, start, report, terminate --------------------------------

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync_once()
            except Exception:  # noqa: BLE001 - a failed pass is retried on the next one
                self._record_error()
            self._stop.wait(self.sync_seconds)

    def _record_error(self) -> None:
        self.errors.append(traceback.format_exc())
        with open(self.workdir / "kubelet-errors.log", "a") as log:
            log.write(f"{now()} {self.errors[-1]}\n")

    def _sync_once(self) -> None:
        pods = self.pod_watch.pods()
        present = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            present.add(uid)
            with self._lock:
                if uid in self._busy or self._settled(pod, self._runs.get(uid)):
                    continue  # its worker is still at it (the next pass sees what it did), or it is over
                self._busy.add(uid)
            self._workers.submit(self._sync_pod_once, pod)
        with self._lock:
            gone = [uid for uid in self._runs if uid not in present]
        for uid in gone:  # removed from the API (force-deleted): stop at once
            for process in self._runs[uid].processes():
                processes.stop(process, grace_seconds=0)
            with self._lock:
                del self._runs[uid]
        if not self._stop.is_set():
            self.binder.bind_pending(pods, on_bound=self.pod_watch.assume,
                                     run_all=lambda calls: list(self._workers.map(_call, calls)))

    def _sync_pod_once(self, pod: dict) -> None:
        try:
            self._sync_pod(pod)
        except Exception:  # noqa: BLE001 - retried on the next pass
            self._record_error()
        finally:
            with self._lock:
                self._busy.discard(pod["metadata"]["uid"])

    def _sync_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            run = self._runs.get(uid)
        if meta.get("deletionTimestamp"):
            self._terminate(pod, run)
            return
        if self._settled(pod, run):
            return
        if run is None:
            scratch = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{uid[:8]}"
            run = PodRun(meta["namespace"], meta["name"], uid, [
                ContainerRun(meta["namespace"], meta["name"], uid, c["name"], c.get("image", ""), scratch,
                             sidecar=sidecar)
                for c, sidecar in _containers(pod["spec"])])
            with self._lock:
                self._runs[uid] = run
        regular_done = all(c.terminal for c in run.regular)
        for container in run.containers:
            if container.terminal:
                continue
            if container.sidecar and regular_done:
                self._stop_sidecar(pod, container)
            elif not container.attempted or (container.restart_at and time.monotonic() >= container.restart_at):
                self._start_container(pod, container)
            elif container.process is not None and not container.running() and container.exit_code is None:
                self._container_exited(pod, container)
        self._report(pod, run)

    @staticmethod
    def _settled(pod: dict, run: PodRun | None) -> bool:
        """Nothing to do for this pod until it is deleted: it finished before this kubelet knew it
        (reported by an earlier one), or it finished here and that was reported."""
        if pod["metadata"].get("deletionTimestamp"):
            return False
        if run is None:
            return pod.get("status", {}).get("phase") in TERMINAL_PHASES
        return run.terminal and bool(run.reported) and run.reported["phase"] in TERMINAL_PHASES

    def _start_container(self, pod: dict, run: ContainerRun) -> None:
        container = next(c for c, _ in _containers(pod["spec"]) if c["name"] == run.container)
        try:
            volumes = secret_volumes(pod, container, self._fetch_data)  # (mounted before env is resolved)
            env = container_env(pod, container, self._fetch_data)
            argv = command_line(container, env)
        except ConfigError as error:
            run.waiting = (error.reason, str(error))
            return
        run.workdir.mkdir(parents=True, exist_ok=True)
        folders = self._write_volumes(run, volumes)
        # The termination message file, fresh for each start, mapped as a mount is.
        run.termination_log = run.workdir / f"{run.container}-termination-log"
        run.termination_log.write_text("")
        folders[container.get("terminationMessagePath") or "/dev/termination-log"] = str(run.termination_log)
        env = {name: map_mounted_paths(value, folders) for name, value in env.items()}
        argv = [map_mounted_paths(arg, folders) for arg in argv]
        if run.attempted:  # a restart: keep the previous log for --previous
            run.restart_count += 1
            run.previous_log_path = run.log_path
        run.attempted = True
        run.log_path = run.workdir / f"{run.container}-{run.restart_count}.log"
        base = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
        port = self.cluster.server.rsplit(":", 1)[1]
        full_env = {**base, "HOME": str(run.workdir), "HOSTNAME": run.pod,
                    "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
                    **self.extra_env, **env}
        run.waiting, run.exit_code, run.restart_at, run.process = None, None, 0.0, None
        run.started_at = now()
        try:
            run.process = processes.spawn(argv, run.log_path, env=full_env, cwd=run.workdir)
        except OSError as error:  # e.g. command not found: the container fails to start
            run.exit_code = 128
            run.finished_at = now()
            run.last_terminated = {"exitCode": 128, "reason": "StartError",
                                   "message": str(error), "startedAt": run.started_at,
                                   "finishedAt": run.finished_at}
            self._after_exit(pod, run, 128)

    @staticmethod
    def _write_volumes(run: ContainerRun, volumes: dict[str, dict[str, str]]) -> dict[str, str]:
        """Each mounted Secret's files, written afresh (a restart sees the Secret as it is now) as read-only
        files in <pod scratch>/volumes/<mountPath with / as _>; returns {mountPath: that folder}."""
        folders = {}
        for mount_path, files in volumes.items():
            folder = run.workdir / "volumes" / (mount_path.strip("/").replace("/", "_") or "_")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for relative, text in files.items():
                path = folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(0o444)
            folders[mount_path] = str(folder)
        return folders

    def _container_exited(self, pod: dict, run: ContainerRun) -> None:
        code = run.process.returncode
        run.exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128+N
        run.finished_at = now()
        run.last_terminated = {"exitCode": run.exit_code,
                               "reason": "Completed" if run.exit_code == 0 else "Error",
                               "startedAt": run.started_at, "finishedAt": run.finished_at}
        container = next((c for c, _ in _containers(pod["spec"]) if c["name"] == run.container), {})
        message = _termination_message(run, container.get("terminationMessagePolicy") == "FallbackToLogsOnError")
        if message:
            run.last_terminated["message"] = message
        self._after_exit(pod, run, run.exit_code)

    def _after_exit(self, pod: dict, run: ContainerRun, code: int) -> None:
        policy = "Always" if run.sidecar else pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            # Back off 1, 2, 4 ... 10 s (a real kubelet: 10 s ... 5 min).
            run.restart_at = time.monotonic() + min(10.0, 2.0 ** run.restart_count)
            run.waiting = ("CrashLoopBackOff", f"back-off restarting failed container "
                                               f"{run.container}")
        else:
            run.terminal = True

    def _stop_sidecar(self, pod: dict, run: ContainerRun) -> None:
        """A native sidecar once the regular containers are over: SIGTERM, SIGKILL at the deadline."""
        if run.running():
            self._signal(run, pod["spec"].get("terminationGracePeriodSeconds", 30))
            return
        if run.process is not None and run.exit_code is None:
            self._container_exited(pod, run)
        run.terminal, run.waiting = True, None

    @staticmethod
    def _signal(run: ContainerRun, grace: float) -> None:
        if run.kill_at is None:
            run.kill_at = time.monotonic() + grace
            processes.signal_group(run.process, signal.SIGTERM)
        elif time.monotonic() >= run.kill_at:
            processes.signal_group(run.process, signal.SIGKILL)

    def _terminate(self, pod: dict, run: PodRun | None) -> None:
        """Graceful deletion: SIGTERM to every container, SIGKILL at the deadline, then finish the delete."""
        live = [c for c in run.containers if c.running()] if run is not None else []
        if live:
            for container in live:
                self._signal(container, pod["metadata"].get("deletionGracePeriodSeconds", 30))
            return
        meta = pod["metadata"]
        try:
            self.node_api.request(
                "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                      "preconditions": {"uid": meta["uid"]}})
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def _fetch_data(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        plural = {"configmap": "configmaps", "secret": "secrets"}[kind]
        try:
            obj = self.node_api.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as error:
            if error.status == 404:
                return None
            # 403 right after binding: the Node authorizer's graph has not yet linked
            # this pod to the object. Retry on the next pass, as a kubelet would.
            raise ConfigError(str(error)) from error
        return object_data(kind, obj)

    # ----- status -----------------------------------------------------------------------

    def _report(self, pod: dict, run: PodRun) -> None:
        status = pod_status(run)
        if status == run.reported:
            return
        meta = pod["metadata"]
        try:
            self.node_api.strategic_patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"metadata": {"uid": meta["uid"]},
                 "status": with_transition_times(status, run.reported)})
            run.reported = status
        except ApiError as error:
            if error.status != 404:
                raise

    def _find_log(self, namespace: str, pod: str, container: str, previous: bool):
        run = self.pod_run_of(namespace, pod)
        run = run.container(container) if run is not None else None
        if run is None:
            return None
        path = run.previous_log_path if previous else run.log_path
        return None if path is None else (path, run.running)


def _termination_message(run: ContainerRun, fallback_to_logs: bool) -> str:
    """As a kubelet: the container's termination message file (its last 4096 bytes); empty, with
    FallbackToLogsOnError and a failed exit, the end of its log (80 lines, 2048 bytes at most)."""
    try:
        text = run.termination_log.read_bytes()[-4096:].decode("utf-8", "replace") if run.termination_log else ""
    except OSError:
        text = ""
    if not text and fallback_to_logs and run.exit_code and run.log_path is not None:
        lines = run.log_path.read_bytes().splitlines(keepends=True)[-80:]
        text = b"".join(lines)[-2048:].decode("utf-8", "replace")
    return text


def _containers(spec: dict) -> list[tuple[dict, bool]]:
    """The containers the test kubelet runs, each with whether it is a native sidecar: those first
    (an init container with restartPolicy Always, as a kubelet starts them), then the regular ones."""
    sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    return [(c, True) for c in sidecars] + [(c, False) for c in spec["containers"]]


def _kubernetes_version() -> str:
    from tests.cluster.tools import pinned_versions
    return pinned_versions()["KUBERNETES_VERSION"]


def _call(call):
    return call()
