"""The scheduler's part of the test kubelet: bind Pending pods that fit its node."""
from __future__ import annotations

from fractions import Fraction

from tests.cluster.pod_status import TERMINAL_PHASES, now
from tests.cluster.podspec import pod_requests, selects_node, shortfall, tolerates
from tests.cluster.rest import ApiError, Rest


class NodeBinder:
    """Binds, oldest first, the Pending pods that fit the node: the sum of the
    requests of its non-terminated pods stays within allocatable, nodeSelector
    and NoSchedule/NoExecute taints are respected. The others are marked
    Unschedulable, as kube-scheduler does, and stay Pending."""

    def __init__(self, node_name: str, allocatable: dict[str, Fraction],
                 labels: dict[str, str], scheduler_api: Rest, node_api: Rest):
        self.node_name = node_name
        self.allocatable = allocatable
        self.labels = labels
        self.scheduler_api = scheduler_api  # system:kube-scheduler may bind
        self.node_api = node_api
        self._unschedulable_reported: dict[str, str] = {}

    def bind_pending(self, own_pods: list[dict], on_bound=lambda pod: None,
                     run_all=lambda calls: [call() for call in calls]) -> None:
        """on_bound(pod): told of each pod bound here, with spec.nodeName set;
        run_all(calls): makes the binding calls (decided in turn, sent together)."""
        used: dict[str, Fraction] = {}
        for pod in own_pods:
            if pod.get("status", {}).get("phase") not in TERMINAL_PHASES:
                for name, amount in pod_requests(pod).items():
                    used[name] = used.get(name, Fraction(0)) + amount
        pending = self.scheduler_api.get(
            "/api/v1/pods", fieldSelector="spec.nodeName=,status.phase=Pending")["items"]
        if not pending:
            return
        pending.sort(key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))
        # Fresh taints: the node lifecycle controller lifts "not-ready" soon after registration.
        node = self.node_api.get(f"/api/v1/nodes/{self.node_name}")
        taints = node["spec"].get("taints") or []
        bindings = []
        for pod in pending:
            meta, spec = pod["metadata"], pod["spec"]
            if spec.get("schedulerName", "default-scheduler") != "default-scheduler" \
                    or meta.get("deletionTimestamp"):
                continue
            if not selects_node(pod, self.labels) or not tolerates(pod, taints):
                self._mark_unschedulable(pod, "node(s) didn't match the pod's node "
                                              "selector or had untolerated taints")
                continue
            requests = pod_requests(pod)
            lacking = shortfall(requests, used, self.allocatable)
            if lacking:
                self._mark_unschedulable(pod, ", ".join(f"Insufficient {r}" for r in lacking))
                continue
            for name, amount in requests.items():
                used[name] = used.get(name, Fraction(0)) + amount
            bindings.append(lambda pod=pod: self._bind(pod, on_bound))
        run_all(bindings)

    def _bind(self, pod: dict, on_bound) -> None:
        meta = pod["metadata"]
        try:
            self.scheduler_api.post(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding",
                {"apiVersion": "v1", "kind": "Binding",
                 "metadata": {"name": meta["name"], "uid": meta["uid"]},
                 "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
        except ApiError as error:
            # 404/409: deleted, or bound elsewhere meanwhile; 403: its namespace
            # is being deleted. Either way, not this pod.
            if error.status in (403, 404, 409):
                return
            raise
        on_bound({**pod, "spec": {**pod["spec"], "nodeName": self.node_name}})

    def _mark_unschedulable(self, pod: dict, why: str) -> None:
        """Say why it waits, in the PodScheduled condition, as kube-scheduler does."""
        uid = pod["metadata"]["uid"]
        message = f"0/1 nodes are available: 1 {why}."
        if self._unschedulable_reported.get(uid) == message:
            return
        meta = pod["metadata"]
        try:
            self.scheduler_api.strategic_patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"status": {"conditions": [{"type": "PodScheduled", "status": "False",
                                            "reason": "Unschedulable", "message": message,
                                            "lastTransitionTime": now()}]}})
            self._unschedulable_reported[uid] = message
        except ApiError as error:
            if error.status != 404:
                raise
