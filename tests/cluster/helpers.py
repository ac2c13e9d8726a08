"""Small helpers for tests against the test cluster."""
from __future__ import annotations

import json
import sys

from tests.cluster.rest import Rest
from tests.cluster.waiting import wait_until


def python_pod(name: str, code: str, *, restart_policy: str = "Never", gpus: int = 0,
               env: list[dict] | None = None, labels: dict | None = None,
               grace_seconds: int | None = None) -> dict:
    """A pod whose container runs a Python snippet with this interpreter."""
    container = {"name": "main", "image": "kubetune/trial:test",
                 "command": [sys.executable, "-u", "-c", code], "env": env or []}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    spec = {"restartPolicy": restart_policy, "containers": [container]}
    if grace_seconds is not None:
        spec["terminationGracePeriodSeconds"] = grace_seconds
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def manifest(*objects: dict) -> str:
    """Objects as input for `kubectl apply -f -` (JSON is YAML)."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})


def get_pod(api: Rest, namespace: str, name: str) -> dict:
    return api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")


def wait_for_phase(api: Rest, namespace: str, name: str, phase: str,
                   timeout: float = 60) -> dict:
    return wait_until(lambda: (pod := get_pod(api, namespace, name))["status"].get("phase")
                      == phase and pod, timeout, f"pod {namespace}/{name} to be {phase}")


def phases(api: Rest, namespace: str) -> dict[str, str]:
    pods = api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
    return {p["metadata"]["name"]: p["status"].get("phase", "") for p in pods}


def terminated_state(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]
