"""What a pod asks for, read the way the kubelet and scheduler read it: resource
requests, scheduling constraints, the container's command line and environment,
and the files of the Secret volumes it mounts."""
from __future__ import annotations

import base64
import math
import re
from fractions import Fraction
from typing import Callable

from tests.cluster.quantity import parse_quantity

GPU = "nvidia.com/gpu"
RESOURCES = ("cpu", "memory", GPU, "pods")


class ConfigError(Exception):
    """The container cannot be configured yet (a referenced ConfigMap/Secret/key is missing)."""

    reason = "CreateContainerConfigError"  # the container's waiting reason, as a kubelet reports it


class MountError(ConfigError):
    """A volume cannot be set up yet (its Secret, or a key it names, is missing): as a real kubelet, the
    pod stays ContainerCreating, not ready, and the message says why (a kubelet's FailedMount event)."""

    reason = "ContainerCreating"


def pod_requests(pod: dict) -> dict[str, Fraction]:
    """Requests of a pod as the scheduler counts them: the sum over its containers,
    at least the largest init container's, plus one pod slot. Limits stand in for
    missing requests, as the API server's defaulting does."""
    spec = pod["spec"]

    def requests_of(container: dict) -> dict[str, Fraction]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {name: parse_quantity(value) for name, value in merged.items()}

    total: dict[str, Fraction] = {}
    for container in spec.get("containers", []):
        for name, value in requests_of(container).items():
            total[name] = total.get(name, Fraction(0)) + value
    for container in spec.get("initContainers") or []:
        for name, value in requests_of(container).items():
            total[name] = max(total.get(name, Fraction(0)), value)
    total["pods"] = Fraction(1)
    return total


def shortfall(requests: dict[str, Fraction], used: dict[str, Fraction],
              allocatable: dict[str, Fraction]) -> list[str]:
    """Names of the resources this node lacks for the requests (empty: it fits)."""
    return [name for name, amount in requests.items()
            if amount > 0 and used.get(name, 0) + amount > allocatable.get(name, 0)]


def selects_node(pod: dict, labels: dict[str, str]) -> bool:
    selector = pod["spec"].get("nodeSelector") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def tolerates(pod: dict, taints: list[dict]) -> bool:
    """Whether the pod tolerates every NoSchedule/NoExecute taint of the node."""
    tolerations = pod["spec"].get("tolerations") or []

    def tolerated(taint: dict) -> bool:
        for t in tolerations:
            if t.get("effect") and t["effect"] != taint.get("effect"):
                continue
            if t.get("operator") == "Exists":
                if not t.get("key") or t["key"] == taint["key"]:
                    return True
            elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
                return True
        return False

    return all(tolerated(taint) for taint in taints
               if taint.get("effect") in ("NoSchedule", "NoExecute"))


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes a $,
    unknown references stay as written."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _REFERENCE.sub(replace, text)


def command_line(container: dict, env: dict[str, str]) -> list[str]:
    """The container's command and args (no image here, so a command is required)."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise ConfigError(f"container {container['name']!r} has no command or args; the test "
                          "kubelet runs no images, so it needs the command line")
    return [expand(arg, env) for arg in argv]


# fetch(kind, namespace, name) -> the object's data as str->str, or None if missing
Fetch = Callable[[str, str, str], "dict[str, str] | None"]


def _field(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", "127.0.0.1"),
        "status.podIP": status.get("podIP", "127.0.0.1"),
    }
    if path not in simple:
        raise ConfigError(f"fieldRef {path!r} is not supported by the test kubelet")
    return simple[path]


def _resource_field(container: dict, ref: dict) -> str:
    kind, _, name = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(math.ceil(parse_quantity(value) / divisor))


def container_env(pod: dict, container: dict, fetch: Fetch) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom first, then env
    (which wins), each value able to refer to earlier ones with $(NAME)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}

    def source(kind: str, ref: dict) -> dict[str, str] | None:
        data = fetch(kind, namespace, ref["name"])
        if data is None and not ref.get("optional"):
            raise ConfigError(f"{kind} {namespace}/{ref['name']} not found")
        return data

    for item in container.get("envFrom") or []:
        prefix = item.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key in item:
                env.update({prefix + k: v for k, v in (source(kind, item[key]) or {}).items()})

    for var in container.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        value_from = var["valueFrom"]
        if "fieldRef" in value_from:
            env[var["name"]] = _field(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            env[var["name"]] = _resource_field(container, value_from["resourceFieldRef"])
        else:
            kind, ref = (("configmap", value_from["configMapKeyRef"])
                         if "configMapKeyRef" in value_from
                         else ("secret", value_from["secretKeyRef"]))
            data = source(kind, ref)
            if data is not None and ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ConfigError(f"key {ref['key']!r} not found in {kind} {ref['name']}")
    return env


def object_data(kind: str, obj: dict) -> dict[str, str]:
    """A ConfigMap's or Secret's data as text (Secrets arrive base64-encoded)."""
    if kind == "secret":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def secret_volumes(pod: dict, container: dict, fetch: Fetch) -> dict[str, dict[str, str]]:
    """The files of each Secret volume the container mounts, {mountPath: {relative path: text}}: every key
    of the Secret, or only its `items` (key -> path). Other kinds of volume are not set up (the test
    kubelet runs no images: a process sees the host's file system)."""
    namespace = pod["metadata"]["namespace"]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts: dict[str, dict[str, str]] = {}
    for mount in container.get("volumeMounts") or []:
        secret = (volumes.get(mount["name"]) or {}).get("secret")
        if secret is None:
            continue
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise ConfigError(f"volume {mount['name']!r}: subPath is not supported by the test kubelet")
        failed = f'MountVolume.SetUp failed for volume "{mount["name"]}" : '
        data = fetch("secret", namespace, secret["secretName"])
        if data is None:
            if not secret.get("optional"):
                raise MountError(f'{failed}secret "{secret["secretName"]}" not found')
            data = {}
        files = dict(data)
        if secret.get("items"):
            files = {}
            for item in secret["items"]:
                if item["key"] in data:
                    files[item["path"]] = data[item["key"]]
                elif not secret.get("optional"):
                    raise MountError(f"{failed}references non-existent secret key: {item['key']}")
        mounts[mount["mountPath"].rstrip("/") or "/"] = files
    return mounts


def map_mounted_paths(text: str, folders: dict[str, str]) -> str:
    """text with a mount path it names replaced by the host folder holding that volume's files: the whole
    text or what follows an '=' (`--ca=/var/run/x/ca.crt`), when the path is the mount or under it. The
    longest mount path wins, as the innermost mount hides what is under an outer one."""
    if not folders:
        return text
    paths = sorted(folders, key=len, reverse=True)
    pattern = re.compile(r"(^|=)(" + "|".join(re.escape(p) for p in paths) + r")(?=/|$)")
    return pattern.sub(lambda m: m.group(1) + folders[m.group(2)], text)
