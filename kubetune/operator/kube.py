"""The few Kubernetes API calls kubetune makes, on the official Python client."""

from __future__ import annotations

from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from ..api import schema
from .records import EXPERIMENT_LABEL, now_iso

GROUP, VERSION = schema.GROUP, schema.VERSION


# As many pooled connections as threads may call the API at once (the operator's executor has 32): the
# client's default pool (5 per CPU) discards the surplus, and each new connection costs a TLS handshake on
# both sides.
CONNECTIONS = 32


def load_config() -> None:
    """In a pod: the ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    settings = client.Configuration.get_default_copy()
    settings.connection_pool_maxsize = CONNECTIONS
    client.Configuration.set_default(settings)


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None):
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    # -- experiments ---------------------------------------------------------

    def get_experiment(self, namespace: str, name: str) -> dict | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "experiments", name))

    def patch_experiment_status(self, namespace: str, name: str, status: dict,
                                resource_version: str | None = None) -> bool:
        """resource_version: only if the experiment is still at it; False (a conflict) when it is not."""
        return self._patch_status("experiments", namespace, name, status, resource_version)

    def _patch_status(self, plural: str, namespace: str, name: str, status: dict,
                      resource_version: str | None) -> bool:
        body: dict = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, body)
        except ApiException as e:
            if e.status == 409 and resource_version:
                return False
            raise
        return True

    # -- trials --------------------------------------------------------------

    def list_trials(self, namespace: str, experiment: str) -> list[dict]:
        got = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "trials",
                                                        label_selector=f"{EXPERIMENT_LABEL}={experiment}")
        return got["items"]

    def get_trial(self, namespace: str, name: str) -> dict | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trials", name))

    def create_trial(self, body: dict) -> bool:
        """False when it already exists (a restarted operator creating it again)."""
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, body["metadata"]["namespace"], "trials", body)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def patch_trial(self, namespace: str, name: str, body: dict) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "trials", name, body)

    def patch_trial_status(self, namespace: str, name: str, status: dict, resource_version: str | None = None) -> bool:
        """resource_version: only if the trial is still at it; False (a conflict) when it is not."""
        return self._patch_status("trials", namespace, name, status, resource_version)

    # -- pods ----------------------------------------------------------------

    def create_pod(self, body: dict) -> bool:
        try:
            self.core.create_namespaced_pod(body["metadata"]["namespace"], body)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def get_pod(self, namespace: str, name: str) -> Any:
        return _or_none(lambda: self.core.read_namespaced_pod(name, namespace))

    def pod_owners(self, namespace: str, name: str) -> set[str] | None:
        """The uids of the pod's owners; None when there is no such pod."""
        pod = self.get_pod(namespace, name)
        return None if pod is None else {o.uid for o in pod.metadata.owner_references or []}

    def delete_pod(self, namespace: str, name: str, grace: int | None = None, uid: str | None = None) -> None:
        """uid: only that pod (not one made since under its name)."""
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)) if uid else None
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace, body=body)
        except ApiException as e:
            if e.status not in ((404, 409) if uid else (404,)):
                raise

    def event(self, obj: dict, kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event on `obj`, as `kubectl describe` shows it."""
        meta = obj["metadata"]
        stamp = now_iso()
        self.core.create_namespaced_event(meta["namespace"], {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": kind, "reason": reason, "message": message[:1024],
            "source": {"component": "kubetune-operator"},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        })

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """container: which one, in a pod of several (the API refuses a log request that names none)."""
        try:
            return self.core.read_namespaced_pod_log(name, namespace, container=container) or ""  # (None: empty)
        except ApiException:
            return ""


def _or_none(call):
    try:
        return call()
    except ApiException as e:
        if e.status == 404:
            return None
        raise
