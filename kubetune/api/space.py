"""The search space: typed parameters, their scales, and which are active when.

Samplers see every parameter through the unit interval: `to_unit` and
`from_unit` map a value to [0, 1] and back, honouring log scales, integer
steps and categorical choices, so an algorithm written for the unit cube works
on any space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # double | int | categorical | discrete
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: tuple = ()
    # parent name -> values of the parent under which this parameter is active
    when: Mapping[str, tuple] = field(default_factory=dict)

    @property
    def is_choice(self) -> bool:
        """Chosen from a list of values (categorical or discrete)."""
        return self.type in ("categorical", "discrete")

    @property
    def is_ordered(self) -> bool:
        """Values have an order a sampler may exploit (everything but categorical)."""
        return self.type != "categorical"

    @property
    def n_choices(self) -> int | None:
        """How many values it can take, if finite."""
        if self.is_choice:
            return len(self.values)
        if self.type == "int":
            return int((self.high - self.low) // (self.step or 1)) + 1
        if self.step:
            return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return None

    # -- unit interval ----------------------------------------------------

    def from_unit(self, u: float):
        """The value at position u in [0, 1] of this parameter's scale."""
        u = min(max(float(u), 0.0), 1.0)
        if self.is_choice:
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        if self.type == "int":
            if self.log:
                lo, hi = math.log(self.low - 0.5), math.log(self.high + 0.5)
                v = round(math.exp(lo + u * (hi - lo)))
                return int(min(max(v, self.low), self.high))
            n = self.n_choices
            return int(self.low + min(int(u * n), n - 1) * (self.step or 1))
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return float(min(max(math.exp(lo + u * (hi - lo)), self.low), self.high))
        if self.step:
            n = self.n_choices
            return float(self.low + min(int(u * n), n - 1) * self.step)
        return float(self.low + u * (self.high - self.low))

    def to_unit(self, value) -> float:
        """Position of a value in [0, 1]; discrete values map to the centre of their cell."""
        if self.is_choice:
            return (self.index(value) + 0.5) / len(self.values)
        if self.type == "int":
            if self.log:
                lo, hi = math.log(self.low - 0.5), math.log(self.high + 0.5)
                return (math.log(value) - lo) / (hi - lo)
            return (round((value - self.low) / (self.step or 1)) + 0.5) / self.n_choices
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        if self.step:
            return (round((value - self.low) / self.step) + 0.5) / self.n_choices
        return (value - self.low) / (self.high - self.low)

    def index(self, value) -> int:
        """Index of a categorical or discrete value."""
        for i, v in enumerate(self.values):
            if v == value and type(v) is type(value):
                return i
        for i, v in enumerate(self.values):
            if v == value:
                return i
        raise ValueError(f"{value!r} is not one of {self.name}'s values {list(self.values)}")

    def snap(self, value):
        """The nearest legal value (clipped, stepped, rounded)."""
        if self.is_choice:
            if self.type == "discrete":
                return min(self.values, key=lambda v: abs(v - value))
            return value
        v = min(max(float(value), self.low), self.high)
        if self.type == "int":
            step = self.step or 1
            return int(self.low + round((v - self.low) / step) * step)
        if self.step:
            n = round((v - self.low) / self.step)
            return float(min(self.low + n * self.step, self.high))
        return v

    def contains(self, value) -> bool:
        if self.is_choice:
            try:
                self.index(value)
                return True
            except ValueError:
                return False
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high

    @classmethod
    def from_spec(cls, p: Mapping[str, Any]) -> "Parameter":
        when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in (p.get("when") or {}).items()}
        kind = p["type"]
        low, high = p.get("min"), p.get("max")
        if kind == "int":
            low, high = int(low), int(high)
        elif kind == "double":
            low, high = float(low), float(high)
        return cls(
            name=p["name"],
            type=kind,
            low=low,
            high=high,
            log=bool(p.get("log", False)),
            step=p.get("step"),
            values=tuple(p.get("values") or ()),
            when=when,
        )


class SearchSpace:
    """Parameters in an order where every parent comes before its children."""

    def __init__(self, parameters: Iterable[Parameter]):
        params = list(parameters)
        self.params: tuple[Parameter, ...] = tuple(_parents_first(params))
        self.by_name = {p.name: p for p in self.params}

    @classmethod
    def from_spec(cls, parameters: list[Mapping[str, Any]]) -> "SearchSpace":
        return cls(Parameter.from_spec(p) for p in parameters)

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self):
        return iter(self.params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def has_free_continuous(self) -> bool:
        """An always-active double without a step: two random draws never give the same configuration."""
        return any(p.type == "double" and not p.step and not p.when for p in self.params)

    @property
    def is_conditional(self) -> bool:
        return any(p.when for p in self.params)

    def is_active(self, param: Parameter, assignment: Mapping[str, Any]) -> bool:
        """Active when every parent is active and has one of the wanted values."""
        for parent, wanted in param.when.items():
            if parent not in assignment or assignment[parent] not in wanted:
                return False
        return True

    def from_unit(self, point: Iterable[float]) -> dict:
        """A configuration from one point of the unit cube (one coordinate per parameter)."""
        out: dict[str, Any] = {}
        for p, u in zip(self.params, point):
            if self.is_active(p, out):
                out[p.name] = p.from_unit(u)
        return out

    def to_unit(self, assignment: Mapping[str, Any], fill: float = float("nan")) -> np.ndarray:
        """A configuration as a unit-cube point; inactive parameters get `fill`."""
        return np.array([p.to_unit(assignment[p.name]) if p.name in assignment else fill for p in self.params])

    def sample(self, rng: np.random.Generator) -> dict:
        return self.from_unit(rng.random(len(self.params)))

    def canonical(self, assignment: Mapping[str, Any]) -> dict:
        """Only the active parameters, snapped to legal values, in space order."""
        out: dict[str, Any] = {}
        for p in self.params:
            if self.is_active(p, out):
                if p.name not in assignment:
                    raise ValueError(f"parameter {p.name!r} is active but has no value")
                out[p.name] = p.snap(assignment[p.name])
        return out

    def fitting(self, assignment: Mapping[str, Any]) -> dict | None:
        """An earlier experiment's configuration as one of this space, or None if it does not fit
        (warm start: a parameter it lacked, or a value outside today's bounds)."""
        try:
            params = self.canonical(assignment)
        except ValueError:
            return None
        if all(self.by_name[k].contains(v) for k, v in params.items()):
            return params
        return None

    def key(self, assignment: Mapping[str, Any]) -> tuple:
        """A hashable identity of a configuration (to spot duplicates)."""
        return tuple((name, repr(assignment[name])) for name in self.names if name in assignment)


def _parents_first(params: list[Parameter]) -> list[Parameter]:
    by_name = {p.name: p for p in params}
    done: dict[str, Parameter] = {}

    def visit(p: Parameter):
        for parent in p.when:
            if parent not in done:
                visit(by_name[parent])
        done.setdefault(p.name, p)

    for p in params:
        visit(p)
    return list(done.values())
