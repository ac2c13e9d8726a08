"""Metrics from a trial's output lines, for trials that do not use the SDK.

The default format is Katib's: `name=value` pairs, several per line
(`epoch=3 val_accuracy=0.91`). A custom format is a regular expression with
two groups (name, value) or the named groups `name` and `value`.
"""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=16)
def _compile(fmt: str) -> re.Pattern:
    return re.compile(fmt)


def parse_metric_line(line: str, fmt: str) -> dict[str, float]:
    """Every metric on one line; values that are not numbers are left out."""
    pattern = _compile(fmt)
    named = {"name", "value"} <= set(pattern.groupindex)
    out: dict[str, float] = {}
    for m in pattern.finditer(line):
        name, raw = (m.group("name"), m.group("value")) if named else (m.group(1), m.group(2))
        try:
            out[name] = float(raw)
        except (TypeError, ValueError):
            continue
    return out
