"""Typed settings of an algorithm or scheduler (`settings:` in the spec).

Each algorithm declares its settings once; the declaration validates a spec's
values (naming the field) and fills in defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .validation import Problem, suggestion

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


@dataclass(frozen=True)
class Setting:
    type: type
    default: Any = None
    help: str = ""
    # Returns an error message for a bad value, or None.
    check: Callable[[Any], str | None] | None = None
    choices: tuple = ()


def positive(v) -> str | None:
    return None if v > 0 else f"must be greater than 0; got {v!r}"


def at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}; got {v!r}"


def fraction(v) -> str | None:
    return None if 0 <= v <= 1 else f"must be between 0 and 1; got {v!r}"


def _type_ok(kind: type, value) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_settings(declared: Mapping[str, Setting], given: Mapping[str, Any] | None, path: str) -> list[Problem]:
    problems = []
    for key, value in (given or {}).items():
        here = f"{path}.{key}"
        if key not in declared:
            known = list(declared) or ["(this one takes no settings)"]
            problems.append(Problem(here, f"unknown setting ({suggestion(key, known)})"))
            continue
        s = declared[key]
        if value is None and s.default is None:
            continue
        if not _type_ok(s.type, value):
            problems.append(Problem(here, f"expected {_TYPE_NAMES.get(s.type, s.type.__name__)}, got {value!r}"))
        elif s.choices and value not in s.choices:
            problems.append(Problem(here, f"must be one of {', '.join(map(str, s.choices))}; got {value!r}"))
        elif s.check and (msg := s.check(value)):
            problems.append(Problem(here, msg))
    return problems


def resolve_settings(declared: Mapping[str, Setting], given: Mapping[str, Any] | None) -> dict:
    """Declared defaults overlaid with the given values (already checked)."""
    out = {k: s.default for k, s in declared.items()}
    out.update(given or {})
    return out
