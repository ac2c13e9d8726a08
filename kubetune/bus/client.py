"""The trial side of the bus: what the trial SDK calls on each report.

Reports are buffered and sent in one pipelined round trip (with a poll of the
trial's decision queue) every `batch` reports or `flush_s` seconds, so that
reporting every step costs a training loop microseconds. With wait=True each
report is sent at once and the call blocks up to `wait_s` for its decision
(for trials reporting once an epoch, where an immediate answer matters).
A stop or pause, once seen, is returned by every later call; an exploit is
returned once (a trainer acts on it once), and a copy of it that comes again
(its report sent again and answered again) is not taken. A `wait` answer
(synchronous PBT: the decision is held until the population catches up) keeps
a waiting report waiting, up to `hold_s`, for the real decision on it; the
report is sent again every `repeat_s` meanwhile, so that a scheduler restarted
in between (which holds nothing) answers it. `wait` is never returned: a batched
report, or one whose hold ran out, goes on as `continue`. If the bus is
unreachable the reports stay buffered (up to `max_buffer`, oldest dropped
first) and the trial carries on: losing the bus costs intermediate metrics,
never the trial; closing waits a while for the bus to come back.
"""

from __future__ import annotations

import time
from typing import Mapping

from ..api.trial import CONTINUE, Decision
from .base import MetricBus, Report, address

_FINAL = ("stop", "pause")


class TrialClient:
    def __init__(self, bus: MetricBus, experiment: str, trial: int, *, attempt: int = 1, batch: int = 32,
                 flush_s: float = 0.05, wait: bool = False, wait_s: float = 0.5, max_buffer: int = 10_000,
                 hold_s: float = 3600.0, repeat_s: float = 30.0, close_retry_s: float = 30.0):
        self.bus, self.experiment, self.trial, self.attempt = bus, experiment, trial, attempt
        self.address = address(trial, attempt)  # this run's decision queue
        self.batch, self.flush_s, self.wait, self.wait_s = batch, flush_s, wait, wait_s
        self.hold_s, self.repeat_s, self.close_retry_s = hold_s, repeat_s, close_retry_s
        self.max_buffer = max_buffer
        self.seq = 0
        self.decision: Decision = CONTINUE  # the latest one
        self.decided_seq = 0
        self._handed_seq = 0  # seq of the last exploit handed out: it, and any answer before it, is done
        self.errors = 0
        self.last_error: Exception | None = None  # why the bus was last unreachable
        self._buffer: list[Report] = []
        self._last_flush = time.monotonic()
        self._stale = True
        self._drop_stale()

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        self.last_error = error

    @property
    def undelivered(self) -> int:
        """Reports not (yet) on the bus."""
        return len(self._buffer)

    def _drop_stale(self) -> bool:
        """Passes over the trial's waiting decisions before this run sends its first report. What it holds
        answers an earlier run's reports (a paused trial resumed, a failed pod run again: the answers
        to its last reports arrive after it exits), and a run numbers its reports from 1 again, so
        they would pass for answers to this run's. Nothing is lost: the trial's state answers this
        run's reports again. False while the bus is unreachable (then nothing is sent either)."""
        if self._stale:
            try:
                self.bus.skip_decisions(self.experiment, self.address)
            except Exception as e:
                self._failed(e)
                return False
            self._stale = False
        return True

    def send_report(self, step: float | None, metrics: Mapping[str, float]) -> Decision:
        self.seq += 1
        # The step as a float too, as the metrics: a numpy or tensor integer would not encode, and a report
        # that cannot be sent stays buffered and fails every later send.
        step = None if step is None else float(step)
        self._buffer.append(Report(self.trial, self.seq, step, {k: float(v) for k, v in metrics.items()},
                                   self.attempt))
        if len(self._buffer) > self.max_buffer:
            del self._buffer[0]
        if self.wait and self.decision.action not in _FINAL:
            self._send_and_wait(self.seq)
        elif self.wait:
            self._flush()
        elif len(self._buffer) >= self.batch or time.monotonic() - self._last_flush >= self.flush_s:
            self._flush()
        return self._hand_out()

    def flush(self) -> Decision:
        """Sends what is buffered and picks up decisions that have arrived."""
        self._flush()
        return self._hand_out()

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._drop_stale():  # bus down: keep the reports, carry on training
            return
        try:
            got = self.bus.publish_and_take(self.experiment, self._buffer, self.address)
        except Exception as e:  # bus down: keep the reports, carry on training
            self._failed(e)
            return
        self._buffer = []
        self._apply(got)

    def _hand_out(self) -> Decision:
        """The decision a report() returns: a stop or pause for good, an exploit once."""
        d = self.decision
        if d.wait:
            return CONTINUE
        if d.action not in _FINAL and d.action != "continue":
            self.decision, self._handed_seq = CONTINUE, self.decided_seq
        return d

    def _send_and_wait(self, seq: int) -> None:
        """Sends the buffer and waits for the decision on `seq` in the same round trip."""
        if self.decision.wait:
            self.decision = CONTINUE  # a hold on an earlier (batched) report: that one went on
        self._last_flush = time.monotonic()
        if not self._drop_stale():  # bus down: keep the reports, carry on training
            return
        try:
            got = self.bus.publish_and_wait(self.experiment, self._buffer, self.address, self.wait_s)
        except Exception as e:  # bus down: keep the reports, carry on training
            self._failed(e)
            return
        sent = self._buffer[-1]
        self._buffer = []
        self._apply(got)
        self._await(seq, self._last_flush + self.wait_s, sent)
        if self.decision.wait:  # the hold ran out (or the bus failed): go on without the answer
            self.decision = CONTINUE

    def _await(self, seq: int, deadline: float, sent: Report) -> None:
        held = False
        while ((self.decided_seq < seq or self.decision.wait) and self.decision.action not in _FINAL
               and not self._buffer):
            now = time.monotonic()
            if self.decision.wait and self.decided_seq == seq and not held:
                held, deadline, repeat_at = True, now + self.hold_s, now + self.repeat_s
            if held and now >= repeat_at:
                repeat_at = now + self.repeat_s
                try:
                    self.bus.publish(self.experiment, [sent])  # the same report: applied once
                except Exception as e:
                    self._failed(e)
            left = deadline - now
            if left <= 0:
                return
            try:
                got = self.bus.take_decisions(self.experiment, self.address,
                                              block_s=min(left, repeat_at - now) if held else left)
            except Exception as e:
                self._failed(e)
                return
            self._apply(got)

    def _apply(self, got) -> None:
        for seq, d in got:
            if d.action not in _FINAL and (seq <= self._handed_seq or seq < self.decided_seq and d.action == "continue"):
                continue  # an answer to a report whose exploit was acted on, or an older `continue`
            # An exploit not handed out yet is kept: a later report's `continue` must not hide it, and
            # a `wait` leaves the held report's real answer still awaited.
            exploit_pending = self.decision.action == "exploit"
            if d.wait and exploit_pending:
                continue
            self.decided_seq = max(self.decided_seq, seq)
            if self.decision.action not in _FINAL and not (exploit_pending and d.action == "continue"):
                self.decision = d

    def close(self) -> Decision:
        """Sends what is left. While the bus is down (Redis restarting as the trial ends), tries again
        for up to close_retry_s: the last reports hold the trial's final values, and once the process
        is gone nothing else would send them."""
        decision = self.flush()
        deadline = time.monotonic() + self.close_retry_s
        while self._buffer and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            decision = self.flush()
        return decision
