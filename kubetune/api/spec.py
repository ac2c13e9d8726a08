"""Typed views of a validated Experiment, with the defaults filled in."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .durations import parse_duration
from .space import SearchSpace
from .validation import Problem, SpecError, load_experiment

DEFAULT_ALGORITHM = {"name": "random", "settings": {}}
# Katib's metric lines: `name=value`, several per line, separated by spaces or commas.
DEFAULT_METRIC_FORMAT = r"([A-Za-z_][A-Za-z0-9_./-]*)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)"


@dataclass(frozen=True)
class Objective:
    metric: str
    goal: str
    target: float | None = None
    strategy: str = "best"
    additional_metrics: tuple[str, ...] = ()

    @property
    def sign(self) -> float:
        """Multiplies a value into a loss (lower is better)."""
        return -1.0 if self.goal == "maximize" else 1.0

    def better(self, a: float, b: float) -> bool:
        return a * self.sign < b * self.sign

    def reached(self, value: float) -> bool:
        if self.target is None:
            return False
        return value >= self.target if self.goal == "maximize" else value <= self.target

    def pick(self, values: list[float]) -> float:
        """A trial's objective value from the values it reported, by strategy."""
        if self.strategy == "latest":
            return values[-1]
        if self.strategy == "min":
            return min(values)
        if self.strategy == "max":
            return max(values)
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return values[-1]
        return max(finite) if self.goal == "maximize" else min(finite)


@dataclass(frozen=True)
class Budget:
    max_trials: int = 10
    parallel_trials: int = 1
    max_failed_trials: int = 3
    timeout: float | None = None  # seconds
    trial_timeout: float | None = None  # seconds


@dataclass(frozen=True)
class TrialTemplate:
    command: tuple[str, ...]
    env: tuple[Mapping[str, Any], ...] = ()
    working_dir: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)  # cluster fields travel as written


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    namespace: str | None
    objective: Objective
    parameters: tuple[Mapping[str, Any], ...]
    algorithm: Mapping[str, Any]
    early_stopping: Mapping[str, Any] | None
    budget: Budget
    warm_start_from: tuple[str, ...]
    trial_template: TrialTemplate
    collector_kind: str
    metric_format: str
    document: Mapping[str, Any]

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_spec(list(self.parameters))

    @property
    def seed(self) -> int | None:
        return (self.algorithm.get("settings") or {}).get("seed")

    def search_fingerprint(self) -> str:
        """Identity of what defines the search; a resumed run must keep it (the budget may change)."""
        spec = self.document["spec"]
        keep = {k: spec.get(k) for k in ("objective", "parameters", "algorithm", "earlyStopping")}
        blob = json.dumps(keep, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> "ExperimentSpec":
        spec = doc["spec"]
        obj = spec["objective"]
        budget = spec.get("budget", {})
        max_trials = budget.get("maxTrials", Budget.max_trials)
        template = spec["trialTemplate"]
        collector = spec.get("metricsCollector", {})
        return cls(
            name=doc["metadata"]["name"],
            namespace=doc["metadata"].get("namespace"),
            objective=Objective(
                metric=obj["metric"],
                goal=obj["goal"],
                target=obj.get("target"),
                strategy=obj.get("strategy", "best"),
                additional_metrics=tuple(obj.get("additionalMetrics", ())),
            ),
            parameters=tuple(spec["parameters"]),
            algorithm=spec.get("algorithm") or DEFAULT_ALGORITHM,
            early_stopping=spec.get("earlyStopping"),
            budget=Budget(
                max_trials=max_trials,
                parallel_trials=min(budget.get("parallelTrials", Budget.parallel_trials), max_trials),
                max_failed_trials=budget.get("maxFailedTrials", Budget.max_failed_trials),
                timeout=parse_duration(budget["timeout"]) if "timeout" in budget else None,
                trial_timeout=parse_duration(budget["trialTimeout"]) if "trialTimeout" in budget else None,
            ),
            warm_start_from=tuple((spec.get("warmStart") or {}).get("fromExperiments", ())),
            trial_template=TrialTemplate(
                command=tuple(template["command"]),
                env=tuple(template.get("env", ())),
                working_dir=template.get("workingDir"),
                raw=template,
            ),
            collector_kind=collector.get("kind", "auto"),
            metric_format=collector.get("format", DEFAULT_METRIC_FORMAT),
            document=doc,
        )


def load_spec(path: str | Path) -> ExperimentSpec:
    """Reads, validates and types an Experiment file; raises SpecError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([Problem("(file)", f"not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8")],
                        str(path)) from None
    return ExperimentSpec.from_document(load_experiment(text, str(path)))
