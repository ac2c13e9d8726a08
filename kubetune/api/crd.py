"""The CustomResourceDefinitions, generated from the one schema.

    python -m kubetune.api.crd            # rewrite crds/ and the Helm chart's copy

A test proves the files under crds/ equal what this module generates, so the
API server validates exactly what `kubetune validate` does (the structure and
the CEL rules; settings of each algorithm are checked by the operator, which
records a clear condition on the Experiment).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from . import schema

_CUSTOM_KEYS = ("x-kubetune-format",)


def _openapi(node):
    """The schema as the API server takes it: our own annotations removed."""
    if isinstance(node, dict):
        return {k: _openapi(v) for k, v in node.items() if k not in _CUSTOM_KEYS}
    if isinstance(node, list):
        return [_openapi(v) for v in node]
    return node


def _bounded(spec: dict) -> dict:
    """Limits that let the API server cost the CEL rules (they run once per parameter)."""
    spec = copy.deepcopy(spec)
    spec["properties"]["parameters"]["maxItems"] = 200
    return spec


_COUNT = {"type": "integer"}
MAX_NAME = 57  # an experiment's name: 63 (a label value) less "-" and a trial number of up to 5 digits
CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string"},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
    },
}
EXPERIMENT_STATUS = {
    "type": "object",
    "properties": {
        "phase": {"type": "string"},
        "conditions": {"type": "array", "items": CONDITION,
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        "trials": _COUNT, "running": _COUNT, "succeeded": _COUNT, "pruned": _COUNT, "failed": _COUNT,
        "killed": _COUNT, "paused": _COUNT,
        "bestObjective": {"type": "number"},
        "bestTrial": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "value": {"type": "number"},
                "params": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        },
        "seed": _COUNT,
        "exhausted": {"type": "boolean"},
        "retries": _COUNT,
        # Trials created so far (the next trial's number): a Trial deleted by hand is still counted, as
        # Killed, and its number never used again.
        "created": _COUNT,
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
        # When it last went on after an end (its budget raised), and the seconds it had run by then: the
        # time in between does not count toward budget.timeout.
        "continuedTime": {"type": "string", "format": "date-time"},
        "elapsedBefore": {"type": "number"},
        # The generation of the spec it ended under (an edit since may continue it).
        "observedGeneration": _COUNT,
    },
}

TRIAL_SPEC = {
    "type": "object",
    "required": ["experiment", "number", "params"],
    "properties": {
        "experiment": {"type": "string"},
        "number": {"type": "integer", "minimum": 0},
        "params": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "attempt": {"type": "integer", "minimum": 1},
        # The scheduler's assignment when the trial was made (HyperBand's bracket, its first run's budget).
        "assignment": {"type": "object", "properties": {"bracket": {"type": "integer", "nullable": True},
                                                        "budget": {"type": "number", "nullable": True}}},
    },
}
TRIAL_STATUS = {
    "type": "object",
    "properties": {
        "state": {"type": "string"},
        "value": {"type": "number"},
        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        # The objective's intermediate values, capped so a trial stays far below etcd's object limit.
        "intermediate": {"type": "array", "maxItems": 1000, "items": {"type": "array", "items": {"type": "number"}}},
        "reason": {"type": "string"},
        "podName": {"type": "string"},
        # How the trial is to end, set before its pod is stopped (pruned, killed, timed out).
        "stop": {"type": "object", "properties": {"state": {"type": "string"}, "reason": {"type": "string"}}},
        # Parameters as changed by PBT's explore step (spec.params are the ones it started with).
        "params": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        # What the scheduler did to the trial (assigned budget, pause, resume, PBT exploit), oldest first.
        "events": {"type": "array", "maxItems": 200,
                   "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
    },
}


def _crd(kind: str, plural: str, short: list[str], spec: dict, status: dict, columns: list[dict],
         rules: list[dict] | None = None) -> dict:
    root = {"type": "object", "required": ["spec"], "properties": {"spec": spec, "status": status}}
    if rules:
        root["x-kubernetes-validations"] = rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{schema.GROUP}"},
        "spec": {
            "group": schema.GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List",
                      "shortNames": short, "categories": ["kubetune"]},
            "versions": [{
                "name": schema.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def experiment_crd() -> dict:
    col = lambda name, path, kind="integer", **kw: {"name": name, "type": kind, "jsonPath": path, **kw}  # noqa: E731
    return _crd("Experiment", "experiments", ["exp", "kte"], _bounded(_openapi(schema.SPEC)), EXPERIMENT_STATUS, [
        col("Algorithm", ".spec.algorithm.name", "string"),
        col("Status", ".status.phase", "string"),
        col("Running", ".status.running"),
        col("Paused", ".status.paused"),  # (pausing schedulers: waiting for promotion, holding no pod)
        col("Succeeded", ".status.succeeded"),
        col("Pruned", ".status.pruned"),
        col("Failed", ".status.failed"),
        col("Best", ".status.bestObjective", "number"),
        col("Age", ".metadata.creationTimestamp", "date"),
    ], rules=[{"rule": f"self.metadata.name.size() <= {MAX_NAME}",
               "message": f"metadata.name: at most {MAX_NAME} characters: its trials are named <name>-<number> "
                          "(up to 5 digits), and a trial's name is a label value (at most 63 characters)"}])


def trial_crd() -> dict:
    col = lambda name, path, kind="string", **kw: {"name": name, "type": kind, "jsonPath": path, **kw}  # noqa: E731
    return _crd("Trial", "trials", ["ktt"], TRIAL_SPEC, TRIAL_STATUS, [
        col("Experiment", ".spec.experiment"),
        col("State", ".status.state"),
        col("Value", ".status.value", "number"),
        col("Reason", ".status.reason", priority=1),
        col("Age", ".metadata.creationTimestamp", "date"),
    ])


FILES = {"experiment.yaml": experiment_crd, "trial.yaml": trial_crd}
HEADER = "# Generated by `python -m kubetune.api.crd` from kubetune/api/schema.py; do not edit.\n"


def render(name: str) -> str:
    return HEADER + yaml.safe_dump(FILES[name](), sort_keys=False, width=120)


# The CRDs live in crds/ and, for `helm install`, in the chart's own crds/ folder.
TARGETS = ("crds", "helm/kubetune/crds")


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2]
    for target in TARGETS:
        out = root / target
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            (out / name).write_text(render(name))
            print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
