"""Runs an experiment on this machine: the engine, the local runtime and the state store together.

This is the only place where the engine meets the clock, processes and files.
Running the same experiment again resumes it: finished trials are read back
from the store and never run again; trials cut short are run again.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..api.spec import ExperimentSpec
from ..api.trial import Decision, Trial, TrialState
from ..api.validation import Problem, SpecError
from ..bus.service import already_applied
from ..engine import Completion, Engine, Launch, Stop, goes_on
from ..engine.engine import INTERRUPTED
from ..study import Study, prior_from, warm_start_trials
from .bridge import RUN_ID_KEY, bus_key, connect_redis
from .events import Exited, Reported, Started
from .local import KILL_AFTER, LocalRuntime
from .orphans import clean_up
from .store import StateStore

POLL = 0.2  # seconds the loop waits for an event before checking timeouts
SDK_GRACE = 5.0  # a trial told to stop through the SDK gets this long to exit by itself
SAVE_ELAPSED = 5.0  # seconds between saves of the elapsed time (a run killed with -9 keeps what it spent)


@dataclass
class RunResult:
    spec: ExperimentSpec
    trials: list[Trial]
    completion: Completion | None
    elapsed: float
    state_dir: Path


def open_study(spec: ExperimentSpec, store: StateStore, state_root: Path) -> tuple[Study, dict]:
    """The Study and its saved state, created or resumed from the store."""
    if store.exists:
        state = store.load_state()
        if state.get("fingerprint") != spec.search_fingerprint():
            raise SpecError([Problem(
                "spec", "differs from the earlier run of this experiment in its objective, parameters, "
                "algorithm or early stopping; rename it (metadata.name) or remove "
                f"{store.dir} to start afresh (only budget and trialTemplate may change on resume)")])
        trials = store.load_trials()
    else:
        state, trials = {}, []
    prior = load_prior(spec, state_root)
    study = Study(
        parameters=spec.parameters, algorithm=spec.algorithm, goal=spec.objective.goal,
        early_stopping=spec.early_stopping, prior=prior, trials=trials, seed=state.get("seed"),
    )
    if not store.exists:
        state = {"fingerprint": spec.search_fingerprint(), "seed": study.seed, "elapsed": 0.0}
        store.create(dict(spec.document), state)
    return study, state


def load_prior(spec: ExperimentSpec, state_root: Path) -> list[Trial]:
    """Finished trials of the experiments named in warmStart, that fit this search space, valued by this
    experiment's objective (see warm_start_trials: an earlier one that optimised another is refused)."""
    earlier_trials: list[Trial] = []
    problems = []
    objective = spec.document["spec"]["objective"]
    for i, name in enumerate(spec.warm_start_from):
        where = f"spec.warmStart.fromExperiments[{i}]"
        earlier = StateStore(state_root, name)
        if not earlier.exists:
            problems.append(Problem(where, f"no earlier experiment {name!r} under {state_root}"))
            continue
        trials, problem = warm_start_trials(where, name, earlier.document()["spec"]["objective"], objective,
                                            earlier.load_trials())
        if problem is not None:
            problems.append(problem)
        earlier_trials += trials
    if problems:
        raise SpecError(problems)
    return prior_from(spec.space, earlier_trials)


def run_experiment(
    spec: ExperimentSpec,
    state_root: str | Path,
    base_dir: str | Path = ".",
    on_progress: Callable[[Engine, float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    stop: threading.Event | None = None,
    redis_url: str | None = None,
    redis_password: str | None = None,
    redis_ca: str | None = None,
) -> RunResult:
    """Runs the experiment to its end. `stop` (set from a signal handler, as the CLI does) ends it
    like Ctrl-C, but between two passes of the loop: a KeyboardInterrupt raised at an arbitrary
    point can land between taking a trial's exit event off the queue and recording it, and the
    drain then waits for a process that is already gone.

    redis_url: trials report over Redis Streams there, as pods do (see bridge.py); BusUnreachable
    is raised, before anything is started or written, if it does not answer."""
    bus = connect_redis(redis_url, redis_password, redis_ca) if redis_url else None
    # Absolute: trials run in another working directory and get these paths.
    state_root = Path(state_root).resolve()
    store = StateStore(state_root, spec.name)
    try:
        store.lock()
        # The run before has ended (it held the lock): what it left of its trials (killed with -9, and
        # what the parent-death signal and its guard did not reach) goes before anything starts.
        clean_up(store.processes_file, KILL_AFTER, lambda line: print(line, file=sys.stderr, flush=True))
        study, state = open_study(spec, store, state_root)
    except BaseException:
        store.close()
        if bus is not None:
            bus.close()
        raise
    if state.get("completion") and not _can_continue(state, study, spec):
        store.close()
        if bus is not None:
            bus.close()
        return RunResult(spec, study.trials, Completion(**state["completion"]), state["elapsed"], store.dir)
    if state.get("completion"):
        # Going on past an earlier ending: saved now, so that a run killed with -9 is resumed again
        # (not shown as that ending, over trials it left Running).
        state["completion"] = None
        store.save_state(state)
    start = clock()
    engine = Engine(spec, study, start, elapsed_before=state.get("elapsed", 0.0))
    bus_kw = {}
    if bus is not None:
        had_key = bool(state.get(RUN_ID_KEY))
        key = bus_key(spec.name, state)
        if not had_key:
            store.save_state(state)
        # What an earlier run of this experiment left on its stream (one that crashed: a run deletes its
        # keys as it ends) answers trials that are run again from scratch now: dropped.
        bus.delete_experiment(key)
        env = {"KUBETUNE_REDIS_URL": redis_url}
        if redis_password:
            env["KUBETUNE_REDIS_PASSWORD"] = redis_password
        if redis_ca:
            env["KUBETUNE_REDIS_CA_FILE"] = str(Path(redis_ca).resolve())  # trials run in their own folders
        bus_kw = {"bus": bus, "bus_key": key, "bus_env": env}
    runtime = LocalRuntime(spec, store.trial_dir, Path(base_dir), checkpoints=store.dir / "checkpoints",
                           processes=store.processes_file, **bus_kw)
    try:
        _loop(engine, runtime, store, clock, on_progress, stop, state)
    except KeyboardInterrupt:
        _apply(engine.interrupt(), runtime)
        _drain(engine, runtime, store, clock)
        raise
    finally:
        runtime.close()
        store.save_trials(engine.take_changed())
        state["elapsed"] = engine.elapsed(clock())
        state["completion"] = vars(engine.completion) if engine.completion else None
        state["exhausted"] = engine.exhausted  # (an ending it caused holds whatever the budget)
        store.save_state(state)
        store.close()
    return RunResult(spec, study.trials, engine.completion, state["elapsed"], store.dir)


def _can_continue(state: dict, study: Study, spec: ExperimentSpec) -> bool:
    """A finished run goes on when it was interrupted, or when what ended it no longer holds under this
    spec's budget (maxTrials, maxFailedTrials or timeout raised: engine.goes_on)."""
    completion = state["completion"]
    if completion["reason"] == INTERRUPTED or any(t.state.active for t in study.trials):
        # (Active trials: a later run, killed with -9, that a state written before it was saved cleared.)
        return True
    # (A state saved before "exhausted" was: the algorithm's word is in how it ended.)
    exhausted = state.get("exhausted", "no new configuration" in completion.get("message", ""))
    return goes_on(spec, study.trials, study.best_trial, state.get("elapsed", 0.0), completion["reason"], exhausted)


def _loop(engine, runtime, store, clock, on_progress, stop=None, state=None) -> None:
    last_progress = 0.0
    last_saved = clock()
    while not engine.done:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        _apply(engine.step(clock()), runtime)
        store.save_trials(engine.take_changed())
        for event in runtime.events(POLL):
            _handle(engine, runtime, event, clock())
        _release(engine, runtime)
        store.save_trials(engine.take_changed())
        now = clock()
        if state is not None and now - last_saved >= SAVE_ELAPSED:
            state["elapsed"] = engine.elapsed(now)  # what budget.timeout is measured on
            store.save_state(state)
            last_saved = now
        if on_progress is not None and now - last_progress >= 0.5:
            on_progress(engine, now)
            last_progress = now
    if on_progress is not None:
        on_progress(engine, clock())


def _drain(engine, runtime, store, clock) -> None:
    """After Ctrl-C: wait until every stopped trial has exited and is recorded."""
    while runtime.running:
        for event in runtime.events(POLL):
            _handle(engine, runtime, event, clock())
        _release(engine, runtime)
    store.save_trials(engine.take_changed())


def _apply(actions, runtime) -> None:
    for action in actions:
        if isinstance(action, Launch):
            runtime.start(action.trial)
        elif isinstance(action, Stop):
            runtime.stop(action.number)


def _handle(engine: Engine, runtime: LocalRuntime, event, now: float) -> None:
    if isinstance(event, Started):
        engine.on_started(event.number, now)
    elif isinstance(event, Reported):
        if event.resent_ok and not 0 <= event.number < len(engine.trials):
            # (Anyone with the bus can write to its stream.)
            event.reply(Decision("stop", f"no trial number {event.number} in this experiment"))
            return
        attempt = engine.trials[event.number].attempt
        if event.attempt is not None and event.attempt != attempt:
            # A process of a run before this one (killed with `kill -9`, its trials ran on: stopped with
            # it since, see orphans.py, but one that escaped its group or a bus shared with another
            # machine still can): the trial runs again from the start now, and that run's reports are
            # not the trial's.
            event.reply(Decision("stop", f"superseded: the trial runs again as attempt {attempt}"))
            return
        if event.resent_ok and _applied_before(engine, event):
            if event.number in runtime.waiting and event.step == engine.trials[event.number].last_step:
                decision = _STILL_HELD  # its answer is still held: the new copy waits for it instead
            elif event.step == engine.trials[event.number].last_step:
                decision = engine.on_resent(event.number)
            else:
                decision = engine.on_report(event.number, {}, event.step)  # (an older report: continue)
        else:
            decision = engine.on_report(event.number, event.metrics, event.step)
        if decision.wait:
            # Synchronous PBT: the trial's report() blocks until _release() answers it (a stdout
            # trial cannot wait, and just goes on).
            if event.reply is not None:
                event.reply(decision)  # tells the channel that the answer is held, not lost
                runtime.waiting[event.number] = event.reply
            return
        runtime.waiting.pop(event.number, None)
        _answer(runtime, event.number, event.reply, decision)
    elif isinstance(event, Exited):
        runtime.waiting.pop(event.number, None)
        engine.on_exit(event.number, event.exit_code, now, event.error, stopped=event.stopped)


_STILL_HELD = Decision("wait", "still held")


def _applied_before(engine: Engine, event: Reported) -> bool:
    """Whether this report of the objective is one the trial's history already holds (at a step not
    after its latest: the usual new report costs one comparison). A report without a step cannot
    be told from a new one, and is applied."""
    trial = engine.trials[event.number]
    value = event.metrics.get(engine.objective.metric)
    if event.step is None or value is None or trial.state != TrialState.RUNNING:
        return False
    return already_applied(trial, event.step, float(value))


def _release(engine: Engine, runtime: LocalRuntime) -> None:
    """Answers the trials whose held decisions are made now."""
    for number, decision in engine.released():
        _answer(runtime, number, runtime.waiting.pop(number, None), decision)


def _answer(runtime: LocalRuntime, number: int, reply, decision) -> None:
    if reply is not None:
        reply(decision)
    if decision.stop or decision.action == "pause":
        # An SDK trial hears the decision and gets time to exit (saving its checkpoint on a
        # pause); a stdout trial is stopped now.
        runtime.stop(number, SDK_GRACE if reply is not None else 0.0)
