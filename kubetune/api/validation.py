"""Validation that helps: every problem in a spec, one line each, naming the field.

Two passes. The structural pass walks the schema in schema.py (types, enums,
required and unknown fields). The semantic pass checks what spans fields:
min < max, conditions naming real parameters, algorithm settings, durations.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

import yaml

from . import schema
from .durations import parse_duration


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A spec that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        out = []
        for p in self.problems:
            where = ""
            if self.source and p.line:
                where = f"{self.source}:{p.line}: "
            elif self.source:
                where = f"{self.source}: "
            out.append(f"{where}{p}")
        return out


# ---------------------------------------------------------------- structure


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def is_number(value) -> bool:
    """An int or float, not a bool (YAML's true is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_structure(value, node: dict, path: str = "") -> list[Problem]:
    """Checks `value` against an OpenAPI schema node; returns every problem."""
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
        return []
    if node.get("x-kubernetes-int-or-string"):
        if not (is_number(value) or isinstance(value, str)):
            return [Problem(path, f"expected a number or a string, got {_type_name(value)}")]
        return []
    kind = node.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [Problem(path, f"expected a mapping, got {_type_name(value)}")]
        return _check_object(value, node, path)
    if kind == "array":
        if not isinstance(value, list):
            return [Problem(path, f"expected a list, got {_type_name(value)}")]
        problems = []
        if len(value) < node.get("minItems", 0):
            problems.append(Problem(path, f"expected at least {node['minItems']} item(s), got {len(value)}"))
        for i, item in enumerate(value):
            problems += check_structure(item, node.get("items", {}), _join(path, i))
        return problems
    if kind == "string":
        if not isinstance(value, str):
            return [Problem(path, f"expected a string, got {_type_name(value)}")]
    elif kind == "integer":
        if not (isinstance(value, int) and not isinstance(value, bool)):
            return [Problem(path, f"expected an integer, got {_type_name(value)} {value!r}")]
    elif kind == "number":
        if not is_number(value):
            return [Problem(path, f"expected a number, got {_type_name(value)} {value!r}")]
        if not math.isfinite(value):
            return [Problem(path, f"expected a finite number, got {value!r}")]
    elif kind == "boolean":
        if not isinstance(value, bool):
            return [Problem(path, f"expected true or false, got {_type_name(value)} {value!r}")]
    return _check_scalar(value, node, path)


def _check_object(value: dict, node: dict, path: str) -> list[Problem]:
    problems = []
    props = node.get("properties")
    extra = node.get("additionalProperties")
    for key in node.get("required", ()):
        if key not in value:
            problems.append(Problem(_join(path, key), "required field is missing"))
    for key, item in value.items():
        child = _join(path, str(key))
        if props is not None and key in props:
            problems += check_structure(item, props[key], child)
        elif extra is not None:
            problems += check_structure(item, extra, child)
        elif props is not None and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(Problem(child, _unknown(str(key), props)))
    return problems


def suggestion(key: str, known) -> str:
    """'did you mean ...?' for a near miss, else the list of what is known."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"expected one of: {', '.join(known)}"


def _unknown(key: str, known) -> str:
    return f"unknown field ({suggestion(key, known)})"


def _check_scalar(value, node: dict, path: str) -> list[Problem]:
    if "enum" in node and value not in node["enum"]:
        choices = ", ".join(str(c) for c in node["enum"])
        close = difflib.get_close_matches(str(value), [str(c) for c in node["enum"]], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return [Problem(path, f"must be one of {choices}; got {value!r}{hint}")]
    if "minimum" in node:
        low = node["minimum"]
        if node.get("exclusiveMinimum") and value <= low:
            return [Problem(path, f"must be greater than {low}; got {value!r}")]
        if value < low:
            return [Problem(path, f"must be at least {low}; got {value!r}")]
    if "pattern" in node and not re.fullmatch(node["pattern"], value):
        return [Problem(path, f"{value!r} is not a valid name (expected to match {node['pattern']})")]
    if "maxLength" in node and len(value) > node["maxLength"]:
        return [Problem(path, f"must be at most {node['maxLength']} characters; got {len(value)}")]
    return []


# ---------------------------------------------------------------- semantics


def check_parameters(params: list, path: str = "spec.parameters") -> list[Problem]:
    """Cross-field rules of the search space (the structure is already right)."""
    problems: list[Problem] = []
    by_name: dict[str, dict] = {}
    for i, p in enumerate(params):
        here = _join(path, i)
        name = p["name"]
        if name in by_name:
            problems.append(Problem(f"{here}.name", f"duplicate parameter name {name!r}"))
        by_name[name] = p
        problems += _check_one_parameter(p, here)
    for i, p in enumerate(params):
        for parent, wanted in (p.get("when") or {}).items():
            here = f"{_join(path, i)}.when.{parent}"
            if parent not in by_name:
                problems.append(Problem(here, f"names no parameter ({suggestion(parent, by_name)})"))
                continue
            if parent == p["name"]:
                problems.append(Problem(here, "a parameter cannot depend on itself"))
                continue
            allowed = by_name[parent].get("values")
            if allowed is None:
                problems.append(Problem(here, f"{parent!r} is {by_name[parent]['type']}; conditions need a categorical or discrete parent"))
                continue
            for w in wanted if isinstance(wanted, list) else [wanted]:
                if w not in allowed:
                    problems.append(Problem(here, f"{w!r} is not one of {parent}'s values {allowed}"))
    if not problems:
        cycle = _find_cycle(params)
        if cycle:
            problems.append(Problem(path, f"conditions form a cycle: {' -> '.join(cycle)}"))
    return problems


def _check_one_parameter(p: dict, here: str) -> list[Problem]:
    problems = []
    kind = p["type"]
    if kind in ("double", "int"):
        for bound in ("min", "max"):
            if bound not in p:
                problems.append(Problem(f"{here}.{bound}", f"required for a {kind} parameter"))
            elif kind == "int" and isinstance(p[bound], float) and not p[bound].is_integer():
                problems.append(Problem(f"{here}.{bound}", f"an int parameter needs a whole number; got {p[bound]!r}"))
        if "values" in p:
            problems.append(Problem(f"{here}.values", f"not allowed for a {kind} parameter (use min and max, or type categorical/discrete)"))
        if "min" in p and "max" in p and not p["max"] > p["min"]:
            problems.append(Problem(f"{here}.max", f"must be greater than min (min={p['min']}, max={p['max']})"))
        if p.get("log"):
            if "min" in p and p["min"] <= 0:
                problems.append(Problem(f"{here}.min", f"must be greater than 0 on a log scale; got {p['min']}"))
            if "step" in p:
                problems.append(Problem(f"{here}.step", "cannot be combined with log: true"))
        if kind == "int" and "step" in p and not float(p["step"]).is_integer():
            problems.append(Problem(f"{here}.step", f"an int parameter needs a whole step; got {p['step']!r}"))
        if "step" in p and "min" in p and "max" in p and p["step"] > p["max"] - p["min"]:
            problems.append(Problem(f"{here}.step", f"larger than the range max - min ({p['max'] - p['min']})"))
    else:
        if "values" not in p:
            problems.append(Problem(f"{here}.values", f"required for a {kind} parameter"))
        for field in ("min", "max", "log", "step"):
            if field in p:
                problems.append(Problem(f"{here}.{field}", f"not allowed for a {kind} parameter (list its values)"))
        values = p.get("values") or []
        for j, v in enumerate(values):
            if isinstance(v, (dict, list)) or v is None:
                problems.append(Problem(f"{here}.values[{j}]", f"expected a string, number or boolean, got {_type_name(v)}"))
            elif kind == "discrete" and not is_number(v):
                problems.append(Problem(f"{here}.values[{j}]", f"a discrete parameter takes numbers; got {v!r}"))
        hashable = [v for v in values if not isinstance(v, (dict, list))]
        seen = set()
        for v in hashable:
            key = (type(v).__name__, v)
            if key in seen:
                problems.append(Problem(f"{here}.values", f"duplicate value {v!r}"))
            seen.add(key)
    return problems


def _find_cycle(params: list) -> list[str] | None:
    parents = {p["name"]: list((p.get("when") or {}).keys()) for p in params}
    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for parent in parents.get(name, []):
            if state.get(parent) == 1:
                return trail + [name, parent]
            if state.get(parent) is None:
                found = visit(parent, trail + [name])
                if found:
                    return found
        state[name] = 2
        return None

    for name in parents:
        if name not in state:
            found = visit(name, [])
            if found:
                return found
    return None


def check_spec(spec: dict, broken: set[str] = frozenset()) -> list[Problem]:
    """Semantic checks of a spec; `broken` names fields whose structure is already wrong."""
    # Imported here: the registries import the space, which imports this module.
    from ..suggestion import check_algorithm
    from ..schedulers import check_early_stopping

    def clean(*fields: str) -> bool:
        return not any(b == f"spec.{f}" or b.startswith((f"spec.{f}.", f"spec.{f}[")) or b == "spec"
                       for b in broken for f in fields)

    problems: list[Problem] = []
    params_ok = clean("parameters")
    if params_ok:
        problems += check_parameters(spec["parameters"])
        params_ok = not problems
    if clean("objective"):
        objective = spec["objective"]
        if objective["metric"] in objective.get("additionalMetrics", []):
            problems.append(Problem("spec.objective.additionalMetrics", f"repeats the objective metric {objective['metric']!r}"))
    if clean("budget"):
        budget = spec.get("budget", {})
        for field in ("timeout", "trialTimeout"):
            if field in budget:
                try:
                    parse_duration(budget[field])
                except ValueError as e:
                    problems.append(Problem(f"spec.budget.{field}", str(e)))
        if budget.get("parallelTrials", 1) > budget.get("maxTrials", 10):
            problems.append(Problem("spec.budget.parallelTrials", f"greater than maxTrials ({budget['parallelTrials']} > {budget.get('maxTrials', 10)})"))
    if params_ok and clean("trialTemplate"):
        problems += _check_placeholders(spec)
    fmt = spec.get("metricsCollector", {}).get("format") if clean("metricsCollector") else None
    if fmt is not None:
        problems += _check_format(fmt, "spec.metricsCollector.format")
    if params_ok and clean("algorithm"):
        problems += check_algorithm(spec.get("algorithm"), spec["parameters"], "spec.algorithm")
    if params_ok and clean("earlyStopping", "objective", "budget") and "earlyStopping" in spec:
        problems += check_early_stopping(spec["earlyStopping"], spec, "spec.earlyStopping")
    return problems


def _check_placeholders(spec: dict) -> list[Problem]:
    from .template import BUILTINS, PLACEHOLDER

    known = [p["name"] for p in spec["parameters"]] + list(BUILTINS)
    problems = []
    for i, arg in enumerate(spec["trialTemplate"]["command"]):
        for m in PLACEHOLDER.finditer(arg):
            if m.group(1) not in known:
                problems.append(Problem(f"spec.trialTemplate.command[{i}]",
                                        f"${{{m.group(1)}}} names no parameter ({suggestion(m.group(1), known)})"))
    return problems


def _check_format(fmt: str, path: str) -> list[Problem]:
    try:
        compiled = re.compile(fmt)
    except re.error as e:
        return [Problem(path, f"not a valid regular expression: {e}")]
    named = {"name", "value"} <= set(compiled.groupindex)
    if not named and compiled.groups < 2:
        return [Problem(path, "needs two groups (metric name, value) or the named groups (?P<name>...) and (?P<value>...)")]
    return []


def validate_document(doc) -> list[Problem]:
    """All problems of an Experiment document (a parsed YAML mapping)."""
    problems = check_structure(doc, schema.EXPERIMENT)
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        return problems
    return problems + check_spec(doc["spec"], {p.path for p in problems})


# ---------------------------------------------------------------- loading


def _line_index(node: yaml.Node, path: str = "", out: dict | None = None) -> dict:
    """Maps each field path of a YAML document to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            out[_join(path, str(key.value))] = key.start_mark.line + 1
            _line_index(child, _join(path, str(key.value)), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _line_index(child, _join(path, i), out)
    return out


def _line_for(path: str, lines: dict) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
    return lines.get("")


def parse_yaml(text: str, source: str = "<input>"):
    """Parses one YAML document; a syntax error becomes a SpecError with its line."""
    try:
        docs = [d for d in yaml.compose_all(text, Loader=yaml.SafeLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(e, "problem", None) or str(e)
        raise SpecError([Problem("(yaml)", f"syntax error: {reason}", line)], source) from None
    if len(docs) != 1:
        raise SpecError([Problem("(yaml)", f"expected exactly one YAML document, found {len(docs)}")], source)
    node = docs[0]
    value = yaml.load(text, Loader=yaml.SafeLoader)
    return value, _line_index(node)


def load_experiment(text: str, source: str = "<input>") -> dict:
    """Parses and validates an Experiment document; raises SpecError listing every problem."""
    doc, lines = parse_yaml(text, source)
    problems = validate_document(doc)
    if problems:
        located = [Problem(p.path, p.message, _line_for(p.path, lines)) for p in problems]
        raise SpecError(located, source)
    return doc
