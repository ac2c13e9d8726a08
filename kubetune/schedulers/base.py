"""The interface every scheduler implements, and what they share.

A scheduler is pure logic over the trial list. It answers each reported value
with a Decision and, for the methods that pause and resume trials, tells the
Study what a free worker should do next (`on_ask`). Everything it knows can be
recomputed from the trials (their intermediate values, states and events), so
a scheduler rebuilt after a restart takes the same decisions as the old one.
Values reach the algorithms as losses (lower is better) whatever the goal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..api.settings import Setting, check_settings, resolve_settings
from ..api.space import SearchSpace
from ..api.trial import CONTINUE, Decision, Trial
from ..api.validation import Problem


@dataclass(frozen=True)
class Assignment:
    """What a free worker should do, decided by the scheduler in `Study.ask()`.

    resume: number of a paused trial to resume from its checkpoint; None: start
        a new configuration proposed by the sampler.
    budget: run until the resource reaches this value (None: to the end).
    bracket: the HyperBand bracket of a new trial (recorded in its events).
    prune: paused trials that have now lost for good (the Study marks them Pruned).
    """

    resume: int | None = None
    budget: float | None = None
    bracket: int | None = None
    prune: tuple[int, ...] = ()


class Scheduler:
    name: ClassVar[str]
    SETTINGS: ClassVar[dict[str, Setting]] = {}
    # True when trials must save checkpoints (they are paused and resumed, or copied).
    needs_checkpoints: bool = False
    # True when it answers `pause` and later resumes the trial (the runtime must bring it back).
    pauses: bool = False

    def __init__(self, *, goal: str, space: SearchSpace, seed: int, settings: Mapping[str, Any] | None = None):
        self.goal = goal
        self.sign = -1.0 if goal == "maximize" else 1.0
        self.space = space
        self.seed = int(seed)
        self.settings = resolve_settings(self.SETTINGS, settings)

    @classmethod
    def check(cls, settings: Mapping[str, Any] | None, spec: Mapping[str, Any], path: str) -> list[Problem]:
        """Problems with these settings in this spec, each naming its field."""
        return check_settings(cls.SETTINGS, settings, f"{path}.settings")

    def on_report(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        """The trial reported `value` at `step` (already appended to trial.intermediate)."""
        return CONTINUE

    def on_resent(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision | None:
        """The trial sent its latest report again, still waiting for the answer to it, and this
        scheduler holds nothing for it: a scheduler rebuilt after a restart that lost a held
        decision. The decision on that report if this scheduler can make it again; None: the
        trial's state answers (a stop or pause is recorded there)."""
        return None

    def on_complete(self, trial: Trial, trials: Sequence[Trial]) -> None:
        """The trial finished (succeeded, failed, pruned or killed)."""

    def on_ended(self, trial: Trial) -> None:
        """The trial's process is gone, its final state not known here yet (the cluster's suggestion
        service hears of a pod's end before the trial's final record): stop waiting for it."""

    def released(self, trials: Sequence[Trial]) -> list[tuple[int, Decision]]:
        """Decisions on earlier reports that were answered `wait` (synchronous PBT) and can
        now be made, as (trial number, decision); each is handed out once. Called by the
        Study after reports and completions, and by drivers whenever the trial list changed."""
        return []

    def on_ask(self, trials: Sequence[Trial], new_allowed: bool = True) -> Assignment | None:
        """What a free worker should do; None: a new configuration with no budget.

        new_allowed is False once the experiment starts no new configurations
        (its trial budget is spent): only resumes are wanted then, and brackets
        that will never fill are judged with the trials they have.
        """
        return None

    # -- helpers for subclasses --------------------------------------------

    def loss(self, value: float) -> float:
        return self.sign * float(value)

    def rng(self, *salt: int) -> np.random.Generator:
        """Random numbers that depend only on the seed and the given salt (never on history)."""
        return np.random.default_rng([self.seed, *[int(s) for s in salt]])


def setting_problem(path: str, field: str, message: str) -> Problem:
    return Problem(f"{path}.settings.{field}", message)
