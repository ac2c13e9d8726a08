"""The one schema of an Experiment.

This OpenAPI v3 document is the single source of truth for the shape of an
Experiment: `kubetune validate` walks it (kubetune.api.validation) and the CRD
under crds/ is generated from it. Rules that span several fields (min < max,
conditions naming real parameters) are written in validation.py; those CEL can
express on schemaless values are repeated here, so the API server refuses them
too. The operator runs the full validation and marks an Experiment that fails
it as Failed (reason InvalidSpec) with the same messages.
"""

from __future__ import annotations

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Experiment"

PARAMETER_TYPES = ("double", "int", "categorical", "discrete")
GOALS = ("minimize", "maximize")
# How a trial's objective value is taken from the values it reported.
STRATEGIES = ("best", "latest", "min", "max")
COLLECTORS = ("auto", "sdk", "stdout")

_ANY = {"x-kubernetes-preserve-unknown-fields": True}
_STRING = {"type": "string"}
_NUMBER = {"type": "number"}
_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.-]*$", "maxLength": 63}
# Go-style durations ("90s", "1h30m") or a number of seconds.
DURATION = {"x-kubernetes-int-or-string": True, "x-kubetune-format": "duration"}


def _obj(properties: dict, required: tuple = (), **extra) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _map_of(value_schema: dict) -> dict:
    return {"type": "object", "additionalProperties": value_schema}


PARAMETER = _obj(
    {
        "name": _NAME,
        "type": {"type": "string", "enum": list(PARAMETER_TYPES)},
        "min": _NUMBER,
        "max": _NUMBER,
        "log": {"type": "boolean"},
        "step": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        "values": {"type": "array", "minItems": 1, "items": _ANY},
        # {parent: value} or {parent: [values]}: active only when the parent has one of them.
        "when": _map_of(_ANY),
    },
    required=("name", "type"),
    **{
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.min) || !has(self.max) || self.max > self.min",
                "message": "max must be greater than min",
                "fieldPath": ".max",
            },
            {
                "rule": "!(self.type in ['double', 'int']) || (has(self.min) && has(self.max))",
                "message": "a double or int parameter needs min and max",
                "fieldPath": ".type",
            },
            {
                "rule": "!has(self.log) || !self.log || !has(self.min) || self.min > 0",
                "message": "a log-scaled parameter needs min > 0",
                "fieldPath": ".min",
            },
        ]
    },
)

NAMED_SETTINGS = _obj({"name": _STRING, "settings": _map_of(_ANY)}, required=("name",))

ENV_VAR = _obj({"name": _STRING, "value": _STRING, "valueFrom": _ANY}, required=("name",))

SPEC = _obj(
    {
        "objective": _obj(
            {
                "metric": _NAME,
                "goal": {"type": "string", "enum": list(GOALS)},
                "target": _NUMBER,
                "strategy": {"type": "string", "enum": list(STRATEGIES)},
                "additionalMetrics": {"type": "array", "items": _NAME},
            },
            required=("metric", "goal"),
        ),
        "parameters": {"type": "array", "minItems": 1, "items": PARAMETER},
        "algorithm": NAMED_SETTINGS,
        "earlyStopping": NAMED_SETTINGS,
        "budget": _obj(
            {
                "maxTrials": {"type": "integer", "minimum": 1},
                "parallelTrials": {"type": "integer", "minimum": 1},
                "maxFailedTrials": {"type": "integer", "minimum": 0},
                "timeout": DURATION,
                "trialTimeout": DURATION,
            }
        ),
        "warmStart": _obj({"fromExperiments": {"type": "array", "items": _STRING}}),
        "trialTemplate": _obj(
            {
                "command": {"type": "array", "minItems": 1, "items": _STRING},
                "env": {"type": "array", "items": ENV_VAR},
                "workingDir": _STRING,
                # Cluster only: the local runtime ignores these.
                "image": _STRING,
                "resources": _ANY,
                "nodeSelector": _map_of(_STRING),
                "tolerations": {"type": "array", "items": _ANY},
                "podSpec": _ANY,
            },
            required=("command",),
        ),
        "metricsCollector": _obj(
            {
                "kind": {"type": "string", "enum": list(COLLECTORS)},
                # A regular expression with two groups (name, value) or named groups.
                "format": _STRING,
            }
        ),
    },
    required=("objective", "parameters", "trialTemplate"),
)

METADATA = _obj(
    {
        "name": {
            "type": "string",
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            "maxLength": 63,
        },
        "namespace": _STRING,
        "labels": _map_of(_STRING),
        "annotations": _map_of(_STRING),
    },
    required=("name",),
)

EXPERIMENT = _obj(
    {
        "apiVersion": {"type": "string", "enum": [API_VERSION]},
        "kind": {"type": "string", "enum": [KIND]},
        "metadata": METADATA,
        "spec": SPEC,
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)
