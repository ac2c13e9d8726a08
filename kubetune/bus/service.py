"""The scheduler service loop: reports from the bus in, decisions out.

The local runner and the cluster's suggestion service both host it. It holds
no state of its own: the handler (a Study, or the engine) is rebuilt from the
trial list, and on start the loop re-reads the reports it had taken but not
acknowledged. Applying a report twice is harmless: one that the trial list
already holds is answered from the trial's state, not applied again.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from contextlib import contextmanager
from typing import Callable

from ..api.trial import CONTINUE, Decision, Trial, TrialState, step_from
from .base import Message, MetricBus, position

log = logging.getLogger(__name__)

Handler = Callable[[Message], Decision]
_NONE: dict = {}  # no other metrics (never written to)


class StudyHandler:
    """Feeds reports of the objective `metric` to a Study (with its scheduler)."""

    def __init__(self, study, metric: str, lock: threading.Lock | None = None):
        self.study, self.metric = study, metric
        self.lock = lock or threading.Lock()
        # Synchronous PBT: trial -> (seq, address) of its report answered `wait`, whose decision comes later.
        self.waiting: dict[int, tuple[int, int | str]] = {}

    def __call__(self, msg: Message) -> Decision:
        r = msg.report
        metric, metrics = self.metric, r.metrics
        with self.lock:
            trials = self.study.trials
            if not 0 <= r.trial < len(trials):
                return Decision("stop", f"no trial number {r.trial} in this experiment")
            trial = trials[r.trial]
            if r.attempt != trial.attempt:
                if r.attempt < trial.attempt:  # a lost pod still running: its reports are not the trial's now
                    return _stop(f"superseded: the trial runs again as attempt {trial.attempt}")
                # A retry this service was not told of (its request failed): the report shows the new pod runs.
                trial.start_over(r.attempt)
            if trial.state != TrialState.RUNNING and (trial.state.finished or trial.state == TrialState.PAUSED):
                return _answer_for(trial)
            value = metrics.get(metric)
            if value is None:
                trial.metrics.update({k: v for k, v in metrics.items() if k != metric})
                return CONTINUE
            # Once per report: the objective alone (the usual report) makes no copy.
            others = {k: v for k, v in metrics.items() if k != metric} if len(metrics) > 1 else _NONE
            step = r.step
            if step is None:
                step = step_from(metrics, trial)
            inter = trial.intermediate
            if inter and step <= inter[-1][0] and already_applied(trial, step, value):
                # Sent again: a held report is still held here. Otherwise the trial is still waiting
                # for an answer this process does not have (a restart lost it): the Study makes it
                # again, or hands out the one recorded. An older report: the trial has gone on since.
                if self.waiting.get(r.trial) == (r.seq, r.address):
                    return Decision("wait", "still held")
                if step != inter[-1][0]:
                    return _answer_for(trial)
                decision = self.study.resent(trial)
            else:
                decision = self.study.report_to(trial, step, value, others)
            if decision.wait:
                self.waiting[r.trial] = (r.seq, r.address)
            elif self.waiting:
                self.waiting.pop(r.trial, None)
            return decision

    def released(self) -> list[tuple[int, int, Decision]]:
        """Held decisions made now (a generation complete, a member gone), as (address, seq, decision)."""
        with self.lock:
            out = []
            for trial, decision in self.study.released():
                held = self.waiting.pop(trial.number, None)
                if held is not None:
                    out.append((held[1], held[0], decision))
            return out


def already_applied(trial: Trial, step: float, value: float) -> bool:
    if not trial.intermediate or step > trial.intermediate[-1][0]:
        return False  # the usual case: a new, later step
    # The whole history, not the last few: a batch read again after a failed save or acknowledgement
    # holds up to a batch of a trial's reports, and one older report taken as new is appended after
    # the latest, so that every report after it looks new too. Only reached for a step not after the
    # latest (rare), so the scan costs the usual report nothing.
    # NaN (a diverged run) equals nothing, itself included: two NaNs at the same step are the same report.
    return any(s == step and (v == value or v != v and value != value) for s, v in reversed(trial.intermediate))


def _answer_for(trial: Trial) -> Decision:
    if trial.state == TrialState.PAUSED:
        return _PAUSED
    if trial.state.finished:
        return _stop(trial.reason or f"trial is {trial.state.value}")
    return CONTINUE


# A stopped or paused trial may go on reporting until it sees its answer: decisions are
# immutable, so each distinct answer is made once rather than per report.
_PAUSED = Decision("pause", "paused")


@functools.lru_cache(maxsize=1024)
def _stop(reason: str) -> Decision:
    return Decision("stop", reason)


class SchedulerLoop:
    def __init__(self, bus: MetricBus, experiment: str, handler: Handler, *, consumer: str = "scheduler-0",
                 count: int = 512, persist: Callable[[], None] | None = None,
                 released: Callable[[], list[tuple[int | str, int, Decision]]] | None = None):
        """persist: saves the trial list; called before reports are acknowledged. released: the
        decisions held back earlier (synchronous PBT) and made now, e.g. StudyHandler.released;
        asked after each batch and whenever the bus is quiet (a trial's end can release them)."""
        self.bus, self.experiment, self.handler = bus, experiment, handler
        self.released = released
        self.consumer, self.count, self.persist = consumer, count, persist
        # Held from read to acknowledgement, so that drain() sees every report taken so far handled.
        self.lock = threading.Lock()
        self._recovered = False
        self._next: list[Message] | None = None  # the batch read together with the last acknowledgement
        self.handled = 0
        self._handled_upto = (0, 0)  # stream position of the newest report handled and acknowledged
        self._progress = threading.Condition()

    def run_once(self, block_s: float = 0.1) -> int:
        """Handles one batch of reports; returns how many."""
        with self.lock:
            return self._run_once(block_s)

    def drain(self) -> int:
        """Handles every report on the bus now, including any another thread is in the middle of."""
        total = 0
        while True:
            recovering = not self._recovered  # that pass re-reads this consumer's unacknowledged reports only
            n = self.run_once(block_s=0.0)
            total += n
            if n == 0 and not recovering:
                return total

    def catch_up(self, timeout_s: float = 5.0) -> None:
        """Returns once every report published before the call is handled, as drain() does, but by waiting
        for the running loop rather than taking its lock: many callers at once (each trial's end) wait
        together, and none waits out the loop's blocking read. Drains itself if the loop does not get there."""
        last = self.bus.last_id(self.experiment)
        if last is None:
            return
        target = position(last)
        with self._progress:
            if self._progress.wait_for(lambda: self._handled_upto >= target, timeout_s):
                return
        self.drain()

    def _run_once(self, block_s: float) -> int:
        if self._next is not None:
            msgs, self._next = self._next, None
        elif not self._recovered:
            msgs = self.bus.read(self.experiment, self.consumer, self.count, pending=True)
            self._recovered = not msgs  # (a batch can come back short: entries that are not reports)
        else:
            msgs = self.bus.read(self.experiment, self.consumer, self.count, block_s=block_s)
        if not msgs:
            if self.released is not None and (late := self.released()):
                if self.persist is not None:
                    self.persist()
                self.bus.decide(self.experiment, late)
            return 0
        with _collector_paused():
            # (r.address, its first case inlined: this runs once per report)
            decisions = [(r.trial if r.attempt == 1 else r.address, r.seq, self._handle(m))
                         for m in msgs for r in (m.report,)]
            if self.released is not None:
                decisions += self.released()
            decisions = coalesce(decisions)
        if self.persist is not None:
            self.persist()
        ids = [m.id for m in msgs]
        with _collector_paused():
            if self._recovered:
                # The decisions, the acknowledgement and the read of the next batch in one round trip;
                # the next batch is handled by the next call (still unacknowledged until then). That
                # read does not wait (the collector is paused): with nothing there, the next call does.
                self._next = self.bus.decide_ack_read(self.experiment, decisions, ids, self.consumer,
                                                      self.count, 0.0) or None
            else:
                self.bus.decide_and_ack(self.experiment, decisions, ids)
        self.handled += len(msgs)
        newest = position(ids[-1])  # a batch comes in stream order
        with self._progress:
            self._handled_upto = max(self._handled_upto, newest)
            self._progress.notify_all()
        return len(msgs)

    def _handle(self, m: Message) -> Decision:
        try:
            return self.handler(m)
        except Exception as e:  # noqa: BLE001 -- one report the scheduler cannot take must not stall the rest
            log.warning("experiment %s: report %s of trial %s not handled: %r", self.experiment, m.report.seq,
                        m.report.trial, e, exc_info=True)
            return Decision("continue", f"report not handled: {e}")

    def run(self, stop: threading.Event, block_s: float = 0.1, on_error: Callable[[Exception], None] | None = None):
        """Until `stop` is set; bus errors (Redis restarting) are reported and retried."""
        while not stop.is_set():
            try:
                self.run_once(block_s)
            except Exception as e:  # noqa: BLE001 - the loop must outlive a bus outage
                if on_error is not None:
                    on_error(e)
                stop.wait(0.05)
                self._recovered, self._next = False, None  # re-read whatever was taken and not acknowledged


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector waits while a batch is decoded and handled (it runs at the
    next allocation after). A batch keeps a few container objects per report alive until its end
    (messages, decisions) and each report adds one for good (its [step, value]): collections during
    the batch promoted those to the oldest generation, and the full collections that followed every
    few batches scanned the whole heap, ~3.5 us per report of the loop's ~9.5 (loop alone, 128k
    reports). Never held while waiting (for reports, or on persist): other threads' garbage is
    collected as usual."""
    if not gc.isenabled():  # off already (another loop's pause, or the application's choice): leave it so
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def coalesce(decisions: list[tuple[int | str, int, Decision]]) -> list[tuple[int | str, int, Decision]]:
    """Per trial run, every decision that is not `continue`, plus its latest one: a client only
    needs to know the newest answer, but must never miss a stop, pause or exploit."""
    last: dict[int | str, int] = {}
    for i, (trial, _, _) in enumerate(decisions):
        last[trial] = i
    return [d for i, d in enumerate(decisions) if d[2].action != "continue" or last[d[0]] == i]
