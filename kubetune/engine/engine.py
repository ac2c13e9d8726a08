"""The engine: the control loop of an experiment, with no I/O of its own.

It asks the Study for configurations, keeps at most `parallelTrials` running,
turns what runtimes report (started, metrics, exited) into trial states, and
decides when the experiment is over. A driver (the local runner, the operator)
feeds it events and carries out the actions it returns; tests drive it with a
fake clock and a fake runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..api.durations import format_duration
from ..api.spec import ExperimentSpec
from ..api.validation import is_number
from ..api.trial import CONTINUE, Decision, Trial, TrialState, finite, step_from
from ..study import SearchExhausted, Study

# Why an experiment ended (Katib's condition reasons, where it has one).
GOAL_REACHED = "GoalReached"
MAX_TRIALS = "MaxTrialsReached"
EXHAUSTED = "SearchSpaceExhausted"
MAX_FAILED = "MaxFailedTrialsReached"
TIMEOUT = "Timeout"
NO_RESULT = "NoTrialSucceeded"
INTERRUPTED = "Interrupted"
FAILED_REASONS = (MAX_FAILED, NO_RESULT)
INTERRUPTED_REASON = "interrupted"


@dataclass(frozen=True)
class Launch:
    """Start this trial (its params are final)."""

    trial: Trial


@dataclass(frozen=True)
class Stop:
    """Stop this trial's process; it will be recorded with `state` and `reason` once it exits."""

    number: int
    state: TrialState
    reason: str


@dataclass(frozen=True)
class Completion:
    reason: str
    message: str
    # Over because no new trial may start (maxTrials, or the search space exhausted), with or without a
    # result: a paused trial that the scheduler can still promote keeps the experiment going.
    budget_spent: bool = False

    @property
    def succeeded(self) -> bool:
        return self.reason not in FAILED_REASONS and self.reason != INTERRUPTED


class Engine:
    def __init__(self, spec: ExperimentSpec, study: Study, now: float, elapsed_before: float = 0.0):
        self.spec = spec
        self.study = study
        self.budget = spec.budget
        self.objective = spec.objective
        self._clock_start = now - elapsed_before
        self.completion: Completion | None = None
        self._exhausted = False
        # Trials we asked to stop, and how to record them once their process exits.
        self._stopping: dict[int, tuple[TrialState, str]] = {}
        self.changed: set[int] = set()  # trials whose record changed since the driver last looked
        self._requeue_unfinished()

    # -- state ---------------------------------------------------------------

    @property
    def trials(self) -> list[Trial]:
        return self.study.trials

    def elapsed(self, now: float) -> float:
        return now - self._clock_start

    @property
    def exhausted(self) -> bool:
        """Whether the algorithm said it has no new configuration to try."""
        return self._exhausted

    def count(self, *states: TrialState) -> int:
        return sum(1 for t in self.trials if t.state in states)

    @property
    def running(self) -> list[Trial]:
        return [t for t in self.trials if t.state == TrialState.RUNNING]

    @property
    def done(self) -> bool:
        """Over, and every trial process has exited."""
        return self.completion is not None and not any(t.state.active for t in self.trials)

    def take_changed(self) -> list[Trial]:
        changed, self.changed = sorted(self.changed), set()
        return [self.trials[n] for n in changed]

    # -- events from the runtime ----------------------------------------------

    def on_started(self, number: int, now: float) -> None:
        trial = self.trials[number]
        trial.state = TrialState.RUNNING
        trial.started_at = now
        self.changed.add(number)

    def on_report(self, number: int, metrics: Mapping[str, float], step: float | None = None) -> Decision:
        """A trial reported metrics; returns what it should do next."""
        trial = self.trials[number]
        if trial.state != TrialState.RUNNING or number in self._stopping:
            return Decision("stop", self._stopping.get(number, (None, "trial is not running"))[1])
        metric = self.objective.metric
        others = {k: float(v) for k, v in metrics.items() if k != metric and is_number(v)}
        # Not marked changed: reports are kept in memory and saved with the trial's final record
        # (a trial cut short is run again from the start, so its partial curve is not needed).
        if metric not in metrics or not is_number(metrics[metric]):
            trial.metrics.update(others)
            return CONTINUE
        if step is None:
            step = step_from(metrics, trial)
        decision = self.study.report(trial, step, float(metrics[metric]), **others)
        return self._follow(trial, step, decision)

    def on_resent(self, number: int) -> Decision:
        """The answer to a report the trial sent again (the metric bus delivers at least once): what
        was decided on its latest report, made again if it was held and is held no more."""
        trial = self.trials[number]
        if trial.state != TrialState.RUNNING or number in self._stopping:
            return Decision("stop", self._stopping.get(number, (None, "trial is not running"))[1])
        return self._follow(trial, trial.last_step, self.study.resent(trial))

    def released(self) -> list[tuple[int, Decision]]:
        """Decisions on earlier reports answered `wait` (synchronous PBT) that are made now,
        as (trial number, decision): the driver hands each to the trial still waiting for it.
        Call it after reports and exits: either can complete a generation."""
        out = []
        for trial, decision in self.study.released():
            if trial.state != TrialState.RUNNING or trial.number in self._stopping:
                continue  # being stopped: it hears that instead
            out.append((trial.number, self._follow(trial, trial.last_step, decision)))
        return out

    def _follow(self, trial: Trial, step: float, decision: Decision) -> Decision:
        number = trial.number
        if decision.stop or decision.action == "pause":
            # The Study marked it Pruned or Paused; keep it Running until its process is gone.
            trial.state = TrialState.RUNNING
            if decision.stop:
                self._stopping[number] = (TrialState.PRUNED, decision.reason or "pruned")
            else:
                self._stopping[number] = (TrialState.PAUSED, f"paused at step {step:g}")
        return decision

    def on_exit(self, number: int, exit_code: int | None, now: float, error: str = "", stopped: bool = False) -> None:
        """A trial's process ended; records its final state and value. stopped: the runtime had signalled
        it to stop (a trial that exits cleanly on SIGTERM, as trainers that save on preemption do, was cut
        short all the same)."""
        trial = self.trials[number]
        trial.finished_at = now
        self.changed.add(number)
        self.study.ended(trial)
        values = [v for _, v in trial.intermediate]
        if (number in self._stopping and self._stopping[number][0] == TrialState.KILLED and exit_code == 0
                and not stopped):
            # It finished on its own before the stop reached it: a normal ending, not a kill.
            del self._stopping[number]
        if number in self._stopping and self._stopping[number][0] == TrialState.PAUSED:
            del self._stopping[number]
            if exit_code in (0, None) or exit_code < 0:
                # Checkpointed and gone: the scheduler may resume it later. Not told: it is not over.
                trial.state, trial.finished_at = TrialState.PAUSED, None
                return
        if number in self._stopping:
            state, reason = self._stopping.pop(number)
            value = self.objective.pick(values) if values else None
            if state == TrialState.PRUNED and value is not None and exit_code not in (0, None):
                reason = f"{reason} (then exited with code {exit_code})"
            self.study.tell(trial, value, state=state, reason=reason)
            return
        state, value, reason = judge_exit(self.objective.metric, self.objective.pick, values, exit_code, error)
        self.study.tell(trial, value, state=state, reason=reason)

    # -- the loop ------------------------------------------------------------

    def step(self, now: float) -> list[Launch | Stop]:
        """What to do now: stop overdue trials, end the experiment, fill free slots."""
        actions: list[Launch | Stop] = []
        actions += self._trial_timeouts(now)
        if self.completion is None:
            early = self._check_end(now)
            # Out of new trials, a paused one may still be promoted; anything else ends it now.
            if early is None or (early.budget_spent and self.count(TrialState.PAUSED)):
                actions += self._fill_slots(now)
            self.completion = self._check_end(now)
            if self.completion is not None:
                for t in self.study.prune_paused():
                    self.changed.add(t.number)
                actions += self._stop_all(TrialState.KILLED, f"experiment ended: {self.completion.reason}")
        return actions

    def interrupt(self) -> list[Stop]:
        """Ctrl-C: stop every trial; they are run again when the experiment resumes."""
        self.completion = Completion(INTERRUPTED, "interrupted; run again to resume")
        return self._stop_all(TrialState.KILLED, INTERRUPTED_REASON)

    def _trial_timeouts(self, now: float) -> list[Stop]:
        limit = self.budget.trial_timeout
        if limit is None:
            return []
        out = []
        for t in self.running:
            if t.number not in self._stopping and t.started_at is not None and now - t.started_at > limit:
                reason = f"exceeded trialTimeout ({format_duration(limit)})"
                self._stopping[t.number] = (TrialState.FAILED, reason)
                out.append(Stop(t.number, TrialState.FAILED, reason))
        return out

    def _stop_all(self, state: TrialState, reason: str) -> list[Stop]:
        out = []
        for t in self.trials:
            if t.state == TrialState.PENDING:
                # Never started: nothing to stop.
                if reason == INTERRUPTED_REASON:
                    continue
                self.study.tell(t, None, state=state, reason=reason)
                self.changed.add(t.number)
            elif t.state == TrialState.RUNNING and t.number not in self._stopping:
                self._stopping[t.number] = (state, reason)
                out.append(Stop(t.number, state, reason))
        return out

    def _check_end(self, now: float) -> Completion | None:
        return check_end(self.spec, self.trials, self.study.best_trial, self.elapsed(now), self._exhausted)

    def _fill_slots(self, now: float) -> list[Launch]:
        out = []
        # Launched but not started yet counts as busy too.
        busy = sum(1 for t in self.trials if t.state == TrialState.RUNNING
                   or (t.state == TrialState.PENDING and t.number in self._launched))
        free = self.budget.parallel_trials - busy
        # Trials queued earlier (resumed after an interruption) go first.
        for t in self.trials:
            if free <= 0:
                break
            if t.state == TrialState.PENDING and t.number not in self._launched:
                out.append(self._launch(t))
                free -= 1
        while free > 0:
            # A new configuration while the budget allows; else only a paused trial to resume.
            new = len(self.trials) < self.budget.max_trials and not self._exhausted
            paused = [t for t in self.trials if t.state == TrialState.PAUSED]
            try:
                trial = self.study.ask(new=new)
            except SearchExhausted:
                self._exhausted = True
                continue
            finally:
                # Paused trials the scheduler pruned while picking (synchronous HyperBand's losers at a rung).
                self.changed.update(t.number for t in paused if t.state != TrialState.PAUSED)
            if trial is None:
                break
            self.changed.add(trial.number)
            out.append(self._launch(trial))
            free -= 1
        return out

    _launched: set[int]

    def _launch(self, trial: Trial) -> Launch:
        trial.name = trial.name or f"{self.spec.name}-{trial.number:04d}"
        self._launched.add(trial.number)
        return Launch(trial)

    def _requeue_unfinished(self) -> None:
        """Trials cut short by an interruption or a crash are run again, never finished ones."""
        self._launched = set()
        for t in self.trials:
            interrupted = t.state == TrialState.KILLED and t.reason == INTERRUPTED_REASON
            if t.state.active or interrupted:
                t.start_over()
                self.changed.add(t.number)


def judge_exit(metric: str, pick, values: list[float], exit_code: int | None,
               error: str = "") -> tuple[TrialState, float | None, str]:
    """A trial's final state, value and reason, from how its process ended and what it reported."""
    if exit_code != 0:
        why = f"exited with code {exit_code}" if exit_code is not None else "lost its process"
        return TrialState.FAILED, None, f"{why}{': ' + error if error else ''}"
    if not values:  # (error: what the trial said last of its reports, the SDK's "never reached the bus")
        missing = f"no value for objective metric {metric!r} was reported"
        return TrialState.FAILED, None, f"{missing}: {error}" if error else missing
    value = pick(values)
    if not finite(value):
        return TrialState.FAILED, None, f"objective metric {metric!r} is {value}"
    return TrialState.SUCCEEDED, value, ""


def check_end(spec: ExperimentSpec, trials: list[Trial], best: Trial | None, elapsed: float,
              exhausted: bool) -> Completion | None:
    """Whether the experiment is over, and why (the same rules locally and in a cluster)."""
    budget, objective = spec.budget, spec.objective
    failed = sum(1 for t in trials if t.state == TrialState.FAILED)
    if failed > budget.max_failed_trials:
        return Completion(MAX_FAILED, f"{failed} trials failed (maxFailedTrials is {budget.max_failed_trials})")
    if best is not None and objective.reached(best.value):
        return Completion(GOAL_REACHED, f"trial {best.number} reached the target {objective.target}")
    active = any(t.state.active for t in trials)
    if budget.timeout is not None and elapsed >= budget.timeout:
        ended = Completion(TIMEOUT, f"timeout of {format_duration(budget.timeout)} reached")
    elif len(trials) >= budget.max_trials and not active:
        ended = Completion(MAX_TRIALS, f"all {budget.max_trials} trials finished", budget_spent=True)
    elif exhausted and not active:
        ended = Completion(EXHAUSTED, "the algorithm has no new configuration to try", budget_spent=True)
    else:
        return None
    if best is None:
        # Within maxFailedTrials, yet nothing to show: an experiment without a result has failed (Katib
        # calls it Succeeded; Ray Tune raises; Optuna's best_trial raises).
        by = {s: sum(1 for t in trials if t.state == s) for s in TrialState if s.finished}
        tally = ", ".join(f"{n} {s.value.lower()}" for s, n in by.items() if n)
        return Completion(NO_RESULT, f"{ended.message}, and no trial succeeded ({tally or 'none finished'})",
                          budget_spent=ended.budget_spent)
    return ended


def goes_on(spec: ExperimentSpec, trials: list[Trial], best: Trial | None, elapsed: float, reason: str,
            exhausted: bool) -> bool:
    """Whether an experiment that ended for `reason` goes on under `spec`, its budget changed since: when
    what ended it no longer holds (maxTrials, maxFailedTrials or timeout raised past what it spent; elapsed is
    the time it ran, as budget.timeout measures it), with the same rules as check_end. Never after
    GoalReached or SearchSpaceExhausted (no budget brings those back), nor any other ending (InvalidSpec).
    (An exhausted algorithm also ends NoTrialSucceeded; `exhausted` keeps that ending.)"""
    if reason not in (MAX_TRIALS, MAX_FAILED, TIMEOUT, NO_RESULT):
        return False
    return check_end(spec, trials, best, elapsed, exhausted) is None
