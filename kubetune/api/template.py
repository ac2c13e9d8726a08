"""Filling a trial template with one trial's parameters.

`${lr}` (or Katib's `${trialParameters.lr}`) in a command argument becomes the
parameter's value. An argument that is exactly `${x}` for a conditional
parameter that is inactive in this trial is dropped, together with the flag
just before it (`--momentum ${momentum}` disappears when optimizer is adam).
The same rules build local processes and cluster pods.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

PLACEHOLDER = re.compile(r"\$\{(?:trialParameters\.)?([A-Za-z_][A-Za-z0-9_.-]*)\}")
# Placeholders every trial has, besides its parameters.
BUILTINS = ("trialName", "trialNumber", "trialDir", "experimentName")


def placeholders(args: Sequence[str]) -> set[str]:
    return {m.group(1) for a in args for m in PLACEHOLDER.finditer(a)}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_command(args: Sequence[str], params: Mapping[str, Any], builtins: Mapping[str, Any],
                   all_parameters: Sequence[str]) -> list[str]:
    values = {**{k: format_value(v) for k, v in builtins.items()},
              **{k: format_value(v) for k, v in params.items()}}
    out: list[str] = []
    for arg in args:
        whole = PLACEHOLDER.fullmatch(arg)
        if whole and whole.group(1) in all_parameters and whole.group(1) not in params:
            if out and out[-1].startswith("-"):
                out.pop()
            continue
        out.append(PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), arg))
    return out


def env_name(param: str) -> str:
    return "KUBETUNE_PARAM_" + re.sub(r"[^A-Za-z0-9]", "_", param).upper()


def trial_env(params: Mapping[str, Any], builtins: Mapping[str, Any]) -> dict[str, str]:
    """Environment variables that hand a trial its assignment."""
    env = {
        "KUBETUNE_PARAMS": json.dumps(dict(params)),
        "KUBETUNE_EXPERIMENT": str(builtins["experimentName"]),
        "KUBETUNE_TRIAL": str(builtins["trialNumber"]),
        "KUBETUNE_TRIAL_NAME": str(builtins["trialName"]),
    }
    env.update({env_name(k): format_value(v) for k, v in params.items()})
    return env
