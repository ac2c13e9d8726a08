"""Early stopping and multi-fidelity scheduling (`earlyStopping` in the spec).

A scheduler is pure logic fed with reported metrics; it answers each report
with a Decision (go on, stop, pause, or PBT's exploit) and, for the methods
that pause and resume trials, tells `Study.ask()` what a free worker does next.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..api.validation import Problem, suggestion
from .asha import ASHA
from .base import Assignment, Scheduler
from .hyperband import BOHB, HyperBand, SuccessiveHalving
from .lineage import format_lineage, lineage
from .median import MedianStopping
from .pb2 import PB2
from .pbt import PBT

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (MedianStopping, SuccessiveHalving, HyperBand, ASHA, BOHB, PBT, PB2)
}


def check_early_stopping(early_stopping: Mapping[str, Any], spec: Mapping[str, Any], path: str) -> list[Problem]:
    name = early_stopping["name"]
    if name not in SCHEDULERS:
        known = sorted(SCHEDULERS)
        listed = ", ".join(known) if known else "none in this version"
        return [Problem(f"{path}.name", f"unknown early-stopping method {name!r}; {suggestion(name, known) if known else ''} (known: {listed})")]
    return SCHEDULERS[name].check(early_stopping.get("settings"), spec, path)


def make_scheduler(early_stopping: Mapping[str, Any], *, goal: str, space, seed: int) -> Scheduler:
    cls = SCHEDULERS[early_stopping["name"]]
    return cls(goal=goal, space=space, seed=seed, settings=early_stopping.get("settings"))


def every_report_waits(early_stopping: Mapping[str, Any] | None, *, goal: str, space) -> bool:
    """Whether a trial's every report must wait for its own decision (KUBETUNE_REPORT_WAIT): with
    synchronous PBT, whose checks are held until the population catches up; and with a scheduler that
    pauses trials, so that a trainer never trains (and checkpoints) past the report it was paused at,
    which its resumed run would then skip. Otherwise frequent reports are batched."""
    if not early_stopping:
        return False
    if (early_stopping.get("settings") or {}).get("synch"):
        return True
    return make_scheduler(early_stopping, goal=goal, space=space, seed=0).pauses


__all__ = ["SCHEDULERS", "Assignment", "Scheduler", "check_early_stopping", "make_scheduler", "lineage",
           "format_lineage", "every_report_waits"]
