"""What a runtime tells the driver about its trials."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..api.trial import Decision


@dataclass
class Started:
    number: int


@dataclass
class Reported:
    number: int
    metrics: dict[str, float]
    step: float | None = None
    # Set for reports that wait for an answer (the SDK); stdout lines have none.
    reply: Callable[[Decision], None] | None = field(default=None, repr=False)


@dataclass
class Exited:
    number: int
    exit_code: int | None
    error: str = ""  # the last line of output, when it failed


Event = Started | Reported | Exited
