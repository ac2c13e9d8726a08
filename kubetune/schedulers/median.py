"""Median stopping (Golovin et al., Vizier 2017; Optuna's MedianPruner; Katib's medianstop).

A trial stops at a step when its best value so far is worse than the median
(or another percentile) of the values that completed trials had at the same
step. Completed = succeeded; each one's value at a step is its latest report at
or before that step, so trials need not report at identical steps. Non-finite
reports (NaN, inf) count as not reported, as everywhere in the Study.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np

from ..api.settings import Setting, at_least
from ..api.trial import CONTINUE, Decision, Trial, TrialState
from .base import Scheduler


def _percent(v):
    return None if 0 < v < 100 else f"must be between 0 and 100 (exclusive); got {v!r}"


class MedianStopping(Scheduler):
    name = "median"
    SETTINGS = {
        "startupTrials": Setting(int, 5, "completed trials needed before anything is stopped", at_least(0)),
        "warmupSteps": Setting(float, 0, "no trial is stopped before this step", at_least(0)),
        "minTrialsRequired": Setting(int, 1, "completed trials with a value at the step needed to judge", at_least(1)),
        "percentile": Setting(float, 50, "stop when worse than this percentile of completed trials (50: median)",
                              _percent),
    }

    def on_report(self, trial: Trial, step: float, value: float, trials: Sequence[Trial]) -> Decision:
        s = self.settings
        if step < s["warmupSteps"]:
            return CONTINUE
        done = [t for t in trials if t.state == TrialState.SUCCEEDED and t.number != trial.number]
        if len(done) < s["startupTrials"]:
            return CONTINUE
        at_step = [v for t in done if (v := self._value_at(t, step)) is not None]
        if len(at_step) < max(1, s["minTrialsRequired"]):
            return CONTINUE
        # Percentile of losses: the 50th is the median; a lower percentile stops more.
        cut = float(np.percentile(at_step, s["percentile"]))
        # Finite values only: min() over a list starting with NaN returns NaN, which is never worse.
        best = min(self.loss(v) for st, v in trial.intermediate if st <= step and math.isfinite(v))
        if best > cut:
            return Decision("stop", f"best value so far is worse than the {s['percentile']:g}th percentile "
                            f"of {len(at_step)} completed trials at step {step:g}")
        return CONTINUE

    def _value_at(self, t: Trial, step: float) -> float | None:
        """Loss of t's latest report at or before `step`, if t got that far."""
        if not t.intermediate or t.intermediate[-1][0] < step:
            return None
        steps = [st for st, _ in t.intermediate]
        i = bisect.bisect_right(steps, step) - 1
        while i >= 0 and not math.isfinite(t.intermediate[i][1]):
            i -= 1  # a NaN in the percentile makes it NaN, and then nothing is ever stopped
        return None if i < 0 else self.loss(t.intermediate[i][1])
