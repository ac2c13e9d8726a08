"""How fast the operator turns an applied Experiment into trial pods, on the real test cluster.

    python -m bench.operator [--quick]

Starts the test cluster (kube-apiserver, etcd, controller-manager), a test
kubelet, Redis, the suggestion service and the operator, then measures:
  - latency: from the create call of an Experiment to its first trial pod, and
    to all `parallelTrials` pods (median of several experiments);
  - throughput: trials (and their pods) created per second over a large
    experiment of no-op trials.
Pod creation times are taken when a watch delivers the ADDED event here.
Targets (issue): first pod within 1 s of apply (median); at least 20 trials/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster.control_plane import ControlPlane  # noqa: E402
from tests.cluster.kubelet import TestKubelet  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402

NOOP = ["sh", "-c", "echo score=1"]


class Watcher:
    """Records when each pod / trial of a namespace first appears, and when each first shows as finished."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.pods: dict[str, float] = {}
        self.trials: dict[str, float] = {}
        self.pods_done: dict[str, float] = {}  # phase Succeeded or Failed
        self.trials_done: dict[str, float] = {}  # a final state
        self._stop = threading.Event()
        for kind in ("pods", "trials"):
            threading.Thread(target=self._run, args=(kind,), daemon=True).start()

    def _run(self, kind: str) -> None:
        core, custom = client.CoreV1Api(), client.CustomObjectsApi()
        seen = self.pods if kind == "pods" else self.trials
        while not self._stop.is_set():  # a watch the server ends is started again; first sightings are kept
            w = watch.Watch()
            # Plain JSON events: the client's model classes would cost the observer more than the operator.
            if kind == "pods":
                stream = w.stream(core.list_namespaced_pod, self.namespace, timeout_seconds=3600, deserialize=False)
            else:
                stream = w.stream(custom.list_namespaced_custom_object, "kubetune.io", "v1alpha1",
                                  self.namespace, "trials", timeout_seconds=3600, deserialize=False)
            try:
                for event in stream:
                    if self._stop.is_set():
                        return
                    obj, now = event["object"], time.monotonic()
                    name = obj["metadata"]["name"]
                    seen.setdefault(name, now)
                    status = obj.get("status") or {}
                    if kind == "pods" and status.get("phase") in ("Succeeded", "Failed"):
                        self.pods_done.setdefault(name, now)
                    elif kind == "trials" and status.get("state") in ("Succeeded", "Failed", "Pruned", "Killed"):
                        self.trials_done.setdefault(name, now)
            except Exception:  # noqa: BLE001 - "response ended prematurely" under load: watch again
                continue

    def stop(self) -> None:
        self._stop.set()


def experiment(name: str, namespace: str, trials: int, parallel: int) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"objective": {"metric": "score", "goal": "maximize"},
                     "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
                     "algorithm": {"name": "random", "settings": {"seed": 1}},
                     "budget": {"maxTrials": trials, "parallelTrials": parallel, "maxFailedTrials": trials},
                     "trialTemplate": {"command": NOOP}}}


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_of_thread(tid: int) -> float:
    try:
        return cpu_seconds(f"{os.getpid()}/task/{tid}")
    except FileNotFoundError:  # the thread has ended
        return 0.0


def request_counts(cluster) -> dict[tuple, float]:
    """kube-apiserver's apiserver_request_total by (verb, resource, subresource), from its /metrics."""
    out: dict[tuple, float] = {}
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.rindex("}")].replace('"', "").split(","))
        key = (labels.get("verb"), labels.get("resource"), labels.get("subresource", ""))
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class CpuMeter:
    """CPU seconds each component spends over an interval: where a trial's cost goes, whatever else
    loads the machine (wall-clock rates on 2 shared cores vary with the load; CPU per trial does not)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        kubelet = sum(cpu_seconds_of_thread(t.native_id) for t in threading.enumerate() if t.name.startswith("kubelet-"))
        out["test kubelet (bench process)"] = kubelet
        out["bench's own watches and rest"] = own.ru_utime + own.ru_stime - kubelet
        out["trial processes"] = children.ru_utime + children.ru_stime
        return out

    def spent(self) -> dict[str, float]:
        end = self._sample()
        return {name: end[name] - self.start[name] for name in end}


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer and smaller experiments (about a minute)")
    parser.add_argument("--parallel", type=int, default=100, help="parallelTrials of the throughput experiment")
    args = parser.parse_args()
    runs, big = (3, 200) if args.quick else (9, 1000)
    parallel = 8

    cluster = ControlPlane().start()
    work = Path(tempfile.mkdtemp(prefix="kt-bench-"))
    redis = RedisServer(work / "redis")
    redis.start()
    kubelet = TestKubelet(cluster, "bench-node", cpu="1000", memory="1000Gi", max_pods=2000).start()
    procs = []
    try:
        cluster.kubectl("apply", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/experiments.kubetune.io", "crd/trials.kubetune.io")
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONUNBUFFERED": "1"}
        for argv in ([sys.executable, "-m", "kubetune.service", "--host", "127.0.0.1", "--port", str(port),
                      "--redis-url", redis.url],
                     [sys.executable, "-m", "kubetune.operator", "--suggestion-url", f"http://127.0.0.1:{port}",
                      "--redis-url", redis.url]):
            procs.append(subprocess.Popen(argv, env=env, stdout=open(work / f"{argv[2]}.log", "w"),
                                          stderr=subprocess.STDOUT))
        config.load_kube_config(str(cluster.kubeconfig))
        custom = client.CustomObjectsApi()
        cluster.kubectl("create", "namespace", "bench")
        watcher = Watcher("bench")
        time.sleep(2.0)  # let the operator's watches start before the first measurement

        first, full = [], []
        for i in range(runs):
            name = f"latency-{i}"
            t0 = time.monotonic()
            custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "bench", "experiments",
                                                   experiment(name, "bench", parallel, parallel))
            mine = lambda: sorted(t for p, t in list(watcher.pods.items()) if p.startswith(name + "-"))  # noqa: E731
            wait_for(lambda: len(mine()) >= parallel, 60)
            times = mine()
            first.append(times[0] - t0)
            full.append(times[parallel - 1] - t0)

        pids = cluster.pids()
        pids.update({"redis-server": redis.proc.pid, "suggestion service": procs[0].pid, "operator": procs[1].pid})
        meter, requests_before = CpuMeter(pids), request_counts(cluster)
        t0 = time.monotonic()
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "bench", "experiments",
                                               experiment("throughput", "bench", big, args.parallel))
        done = wait_for(lambda: sum(1 for p in list(watcher.pods) if p.startswith("throughput-")) >= big, 900)
        cpu = meter.spent()
        requests_after = request_counts(cluster)
        trial_times = sorted(t for n, t in list(watcher.trials.items()) if n.startswith("throughput-"))
        pod_times = sorted(t for n, t in list(watcher.pods.items()) if n.startswith("throughput-"))
        span = (trial_times[-1] - t0) if trial_times else float("nan")
        print(f"\nOperator on the test cluster (kube-apiserver {cluster_version(cluster)}), "
              f"{os.cpu_count()} CPUs; {'quick' if args.quick else 'full'} run; {cluster.timings.summary()}\n")
        print("| measure | result | target |")
        print("| --- | --- | --- |")
        print(f"| create -> first trial pod, median of {runs} (min-max) | {statistics.median(first):.3f} s "
              f"({min(first):.3f}-{max(first):.3f}) | <= 1 s |")
        print(f"| create -> all {parallel} parallel pods, median | {statistics.median(full):.3f} s | |")
        print(f"| {big} no-op trials, {args.parallel} at a time: trials created per second | {len(trial_times) / span:.1f} /s "
              f"({len(trial_times)} in {span:.1f} s{'' if done else ', incomplete'}) | >= 20 /s |")
        if pod_times:
            print(f"| {big} no-op trials: pods created per second | {len(pod_times) / (pod_times[-1] - t0):.1f} /s | |")
        print(f"\nWhere a trial's time goes in the {big}-trial run (median over its trials; each step ends when the "
              f"bench's watch sees it):\n")
        print("| step | median | 90th percentile |")
        print("| --- | ---: | ---: |")
        steps = (("trial created -> its pod created (operator)", watcher.trials, watcher.pods),
                 ("pod created -> pod finished (test kubelet: bind, start, exit, report)", watcher.pods, watcher.pods_done),
                 ("pod finished -> trial finished (operator: values, log, status)", watcher.pods_done, watcher.trials_done))
        for label, start, end in steps:
            spans = sorted(end[n] - start[n] for n in start if n.startswith("throughput-") and n in end)
            if spans:
                print(f"| {label} | {statistics.median(spans):.3f} s | {spans[int(0.9 * (len(spans) - 1))]:.3f} s |")
        done = sorted(t for n, t in watcher.trials_done.items() if n.startswith("throughput-"))
        created = sorted(t for n, t in watcher.trials.items() if n.startswith("throughput-"))
        # A slot freed by the k-th finished trial is filled by the (parallel + k)-th created one.
        refill = sorted(created[args.parallel + k] - done[k] for k in range(min(len(done), len(created) - args.parallel)))
        if refill:
            print(f"| trial finished -> a new trial in its slot (operator: experiment pass, suggestion) | "
                  f"{statistics.median(refill):.3f} s | {refill[int(0.9 * (len(refill) - 1))]:.3f} s |")

        print(f"\nCPU seconds per created trial during the {big}-trial run, by component "
              f"(the machine has {os.cpu_count()} cores: 20 trials/s needs under {os.cpu_count() / 20:.3f} s in all):\n")
        print("| component | CPU s per trial | share |")
        print("| --- | ---: | ---: |")
        total = sum(cpu.values())
        count = max(1, len(trial_times))
        for name, spent in sorted(cpu.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {spent / count:.4f} | {100 * spent / total:.0f}% |")
        print(f"| all | {total / count:.4f} | |")
        print("\nkube-apiserver requests per created trial (all clients), over 0.05:\n")
        print("| verb | resource | per trial |")
        print("| --- | --- | ---: |")
        made = {k: requests_after[k] - requests_before.get(k, 0.0) for k in requests_after}
        for (verb, res, sub), n in sorted(made.items(), key=lambda kv: -kv[1]):
            if n / count > 0.05:
                print(f"| {verb} | {res}{'/' + sub if sub else ''} | {n / count:.2f} |")
        watcher.stop()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        kubelet.stop()
        redis.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def cluster_version(cluster) -> str:
    return cluster.kubectl("version", "-o", "json").stdout.split('"gitVersion": "')[2].split('"')[0]


if __name__ == "__main__":
    main()
