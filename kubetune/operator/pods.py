"""A trial's Pod, built from the experiment's trial template.

The same substitution rules as the local runtime (kubetune.api.template): the
command gets `${param}` values, the environment gets KUBETUNE_PARAMS and one
variable per parameter, plus where to report (the Redis bus) and the trial's
identity. A template's `podSpec` is taken as the base; its first container
runs the trial.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

from ..api.spec import ExperimentSpec
from ..api.template import render_command, trial_env
from ..bus.base import experiment_key
from ..schedulers import every_report_waits
from .records import EXPERIMENT_LABEL, TRIAL_LABEL, current_pod, to_record


def trial_pod(spec: ExperimentSpec, trial: Mapping[str, Any], bus: Mapping[str, Any]) -> dict:
    """bus: {"url": ..., "passwordSecret": {"name": ..., "key": ...}} or {} for none."""
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
    main.setdefault("name", "trial")
    if raw.get("image"):
        main["image"] = raw["image"]
    main.setdefault("image", "kubetune/trial:latest")
    main["command"] = command
    if raw.get("resources"):
        # Quantities as the API writes them (users write `nvidia.com/gpu: 1`).
        main["resources"] = {kind: {k: str(v) for k, v in (amounts or {}).items()}
                             for kind, amounts in raw["resources"].items()}
    if template.working_dir:
        main["workingDir"] = template.working_dir
    env = [dict(e) for e in template.env]
    env += [{"name": k, "value": v} for k, v in trial_env(params, builtins).items()]
    env += [{"name": "KUBETUNE_NAMESPACE", "value": meta["namespace"]},
            {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
            {"name": "PYTHONUNBUFFERED", "value": "1"}]
    budget = to_record(trial).budget
    if budget is not None:  # how far this run should go (HyperBand's rung, a resumed trial's next one)
        env.append({"name": "KUBETUNE_BUDGET", "value": f"{budget:g}"})
    env += _bus_env(bus, spec, meta)
    known = {e["name"] for e in env}
    main["env"] = [e for e in main.get("env", []) if e["name"] not in known] + env
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
            "annotations": {"kubetune.io/params": json.dumps(params)},
            "ownerReferences": [{
                "apiVersion": trial["apiVersion"], "kind": "Trial", "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": pod_spec,
    }


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
    return env
