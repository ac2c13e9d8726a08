"""A trial's Pod, built from the experiment's trial template.

The same substitution rules as the local runtime (kubetune.api.template): the
command gets `${param}` values, the environment gets KUBETUNE_PARAMS and one
variable per parameter, plus where to report (the Redis bus) and the trial's
identity. A template's `podSpec` is taken as the base; its first container
runs the trial, and the pod names it in TRIAL_CONTAINER (kubectl's default
container annotation: `kubectl logs` shows it, and the operator judges the trial
by it, whatever sidecars the template has or a webhook injects, in any order).

A bus over TLS with a private CA (the operator's --redis-ca-secret) adds to each
pod a read-only Secret volume CA_VOLUME, mounted in the trial container at
CA_DIR, and KUBETUNE_REDIS_CA_FILE naming the certificate there. Those names
are reserved: a template that uses them is refused (template_clashes), never
silently overridden.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

from ..api.spec import ExperimentSpec
from ..api.template import render_command, trial_env
from ..api.validation import Problem
from ..bus.base import experiment_key
from ..schedulers import every_report_waits
from .records import EXPERIMENT_LABEL, TRIAL_LABEL, current_pod, to_record

CA_VOLUME = "kubetune-redis-ca"
CA_DIR = "/var/run/kubetune/redis-ca"
CA_ENV = "KUBETUNE_REDIS_CA_FILE"
TRIAL_CONTAINER = "kubectl.kubernetes.io/default-container"


def trial_pod(spec: ExperimentSpec, trial: Mapping[str, Any], bus: Mapping[str, Any]) -> dict:
    """bus: {"url": ..., "passwordSecret": {"name": ..., "key": ...}, "caSecret": {"name": ..., "key": ...}}
    (each Secret optional) or {} for none."""
    meta = trial["metadata"]
    number, attempt = trial["spec"]["number"], trial["spec"].get("attempt", 1)
    params = (trial.get("status") or {}).get("params") or trial["spec"]["params"]
    template = spec.trial_template
    builtins = {"trialName": meta["name"], "trialNumber": number, "trialDir": "/kubetune/trial",
                "experimentName": spec.name}
    names = [p["name"] for p in spec.parameters]
    command = render_command(template.command, params, builtins, names)

    raw = template.raw
    pod_spec = copy.deepcopy(raw.get("podSpec") or {})
    containers = pod_spec.setdefault("containers", [{}])
    main = containers[0]
    main["name"] = trial_container_name(spec)
    if raw.get("image"):
        main["image"] = raw["image"]
    main.setdefault("image", "kubetune/trial:latest")
    main["command"] = command
    # A failed trial's reason then shows its last log lines (the exception), not just "Error"; a clean exit
    # still shows what the trial wrote to its termination log (the SDK: reports that never reached the bus).
    main.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    termination_log = main.get("terminationMessagePath") or "/dev/termination-log"
    if raw.get("resources"):
        # Quantities as the API writes them (users write `nvidia.com/gpu: 1`).
        main["resources"] = {kind: {k: str(v) for k, v in (amounts or {}).items()}
                             for kind, amounts in raw["resources"].items()}
    if template.working_dir:
        main["workingDir"] = template.working_dir
    ca = _ca_secret(bus)
    # (A template's own KUBETUNE_REDIS_CA_FILE, of an experiment started before the operator mounted one: the
    # operator's wins, not a second variable of that name.)
    env = [dict(e) for e in template.env if not (ca and e.get("name") == CA_ENV)]
    env += [{"name": k, "value": v} for k, v in trial_env(params, builtins).items()]
    env += [{"name": "KUBETUNE_NAMESPACE", "value": meta["namespace"]},
            {"name": "KUBETUNE_TERMINATION_LOG", "value": termination_log},  # (the SDK's last word goes there)
            {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
            {"name": "PYTHONUNBUFFERED", "value": "1"}]
    record = to_record(trial)
    if record.budget is not None:  # how far this run should go (HyperBand's rung, a resumed trial's next one)
        env.append({"name": "KUBETUNE_BUDGET", "value": f"{record.budget:g}"})
    if record.resumed_from is not None:  # the checkpoint to resume from (see checkpoint.load_bytes)
        env.append({"name": "KUBETUNE_RESUME_STEP", "value": f"{record.resumed_from:g}"})
    env += _bus_env(bus, spec, meta)
    known = {e["name"] for e in env}
    main["env"] = [e for e in main.get("env", []) if e["name"] not in known] + env
    if ca:  # (template_clashes refused, before it started, a template that uses these names)
        pod_spec.setdefault("volumes", []).append(
            {"name": CA_VOLUME, "secret": {"secretName": ca["name"], "items": [{"key": ca["key"], "path": ca["key"]}]}})
        main.setdefault("volumeMounts", []).append({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True})
    if raw.get("nodeSelector"):
        pod_spec["nodeSelector"] = raw["nodeSelector"]
    if raw.get("tolerations"):
        pod_spec["tolerations"] = raw["tolerations"]
    pod_spec["restartPolicy"] = "Never"  # a failed trial is the engine's to retry, not the kubelet's
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": current_pod(trial),
            "namespace": meta["namespace"],
            "labels": {EXPERIMENT_LABEL: spec.name, TRIAL_LABEL: meta["name"]},
            "annotations": {"kubetune.io/params": json.dumps(params), TRIAL_CONTAINER: main["name"]},
            "ownerReferences": [{
                "apiVersion": trial["apiVersion"], "kind": "Trial", "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": pod_spec,
    }


def trial_container_name(spec: ExperimentSpec) -> str:
    """The name of the trial's container in its pods: the template's first container's, or "trial"."""
    containers = (spec.trial_template.raw.get("podSpec") or {}).get("containers") or [{}]
    return containers[0].get("name") or "trial"


def trial_container(pod: Mapping[str, Any]) -> str | None:
    """The name of the pod's container that runs the trial (a pod made before TRIAL_CONTAINER: its first)."""
    named = ((pod.get("metadata") or {}).get("annotations") or {}).get(TRIAL_CONTAINER)
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return named or containers[0].get("name")


def _bus_env(bus: Mapping[str, Any], spec: ExperimentSpec, trial_meta: Mapping[str, Any]) -> list[dict]:
    if not bus.get("url"):
        return []
    owner = next((o for o in trial_meta.get("ownerReferences") or [] if o.get("kind") == "Experiment"), {})
    env = [{"name": "KUBETUNE_REDIS_URL", "value": bus["url"]},
           {"name": "KUBETUNE_BUS_KEY", "value": experiment_key(trial_meta["namespace"], spec.name, owner.get("uid", ""))},
           {"name": "KUBETUNE_OBJECTIVE", "value": spec.objective.metric}]
    if every_report_waits(spec.early_stopping, goal=spec.objective.goal, space=spec.space):
        env.append({"name": "KUBETUNE_REPORT_WAIT", "value": "1"})
    secret = bus.get("passwordSecret")
    if secret:
        env.append({"name": "KUBETUNE_REDIS_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}})
    ca = _ca_secret(bus)
    if ca:
        env.append({"name": CA_ENV, "value": f"{CA_DIR}/{ca['key']}"})
    return env


def _ca_secret(bus: Mapping[str, Any]) -> Mapping[str, str] | None:
    return bus.get("caSecret") if bus.get("url") else None


def template_clashes(spec: Mapping[str, Any], bus: Mapping[str, Any]) -> list[Problem]:
    """What in an experiment's trial template would collide with what trial_pod adds for the bus's CA: a
    volume of its name, a mount at its path in the trial container, or its variable. The API server would
    refuse a pod with two volumes of a name, and an override would leave the trial with the wrong CA."""
    if not _ca_secret(bus):
        return []
    template = spec.get("trialTemplate") or {}
    pod_spec = template.get("podSpec") or {}
    container = (pod_spec.get("containers") or [{}])[0]
    base = "spec.trialTemplate.podSpec"
    reserved = "is reserved for the Redis CA the operator mounts in every trial pod (--redis-ca-secret)"
    problems = [Problem(f"{base}.volumes[{i}].name", f"{CA_VOLUME!r} {reserved}")
                for i, v in enumerate(pod_spec.get("volumes") or []) if v.get("name") == CA_VOLUME]
    problems += [Problem(f"{base}.containers[0].volumeMounts[{i}].mountPath", f"{CA_DIR} {reserved}")
                 for i, m in enumerate(container.get("volumeMounts") or [])
                 if (m.get("mountPath") or "").rstrip("/") == CA_DIR]
    for path, env in (("spec.trialTemplate.env", template.get("env")), (f"{base}.containers[0].env", container.get("env"))):
        problems += [Problem(f"{path}[{i}].name", f"{CA_ENV} {reserved}")
                     for i, e in enumerate(env or []) if e.get("name") == CA_ENV]
    return problems
