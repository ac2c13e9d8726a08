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
    # From the metric bus, which delivers at least once: the same report may come again (after a
    # Redis restart, or sent again by a trial still waiting for its answer), and is applied once.
    resent_ok: bool = False
    attempt: int | None = None  # the trial's run that sent it (bus reports name it)


@dataclass
class Exited:
    number: int
    exit_code: int | None
    error: str = ""  # the last line of output, when it failed
    stopped: bool = False  # it had been sent SIGTERM (exit code 0 then is not a run that finished)


@dataclass
class Wake:
    """Nothing happened to a trial: the bus loop handled more reports (an exit held back may go now)."""


Event = Started | Reported | Exited | Wake
