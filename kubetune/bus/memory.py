"""The in-memory bus: the same contract as Redis, for one process (threads)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Sequence

from ..api.trial import Decision
from .base import Message, MetricBus, Report


class _Stream:
    def __init__(self, maxlen: int):
        self.entries: list[tuple[int, Report]] = []  # sequence numbers increase by one
        self.maxlen = maxlen
        self.next = 1
        self.delivered = 0  # the group's last delivered sequence number
        self.pending: dict[str, dict[str, Report]] = {}  # consumer -> id -> report


class MemoryBus(MetricBus):
    def __init__(self, maxlen: int = 100_000, decisions_kept: int = 64):
        self.maxlen = maxlen
        self.decisions_kept = decisions_kept
        self._streams: dict[str, _Stream] = {}
        self._decisions: dict[tuple[str, int], deque] = {}
        self._cond = threading.Condition()

    def _stream(self, experiment: str) -> _Stream:
        return self._streams.setdefault(experiment, _Stream(self.maxlen))

    def publish(self, experiment, reports):
        with self._cond:
            s = self._stream(experiment)
            for r in reports:
                s.entries.append((s.next, r))
                s.next += 1
            if len(s.entries) > s.maxlen:
                del s.entries[: len(s.entries) - s.maxlen]
            self._cond.notify_all()

    def take_decisions(self, experiment, trial, block_s=0.0):
        key = (experiment, trial)
        deadline = time.monotonic() + block_s
        with self._cond:
            while not self._decisions.get(key) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            q = self._decisions.get(key)
            out = list(q) if q else []
            if q:
                q.clear()
            return out

    def read(self, experiment, consumer, count=256, block_s=0.0, pending=False):
        deadline = time.monotonic() + block_s
        with self._cond:
            s = self._stream(experiment)
            mine = s.pending.setdefault(consumer, {})
            if pending:
                return [Message(i, r) for i, r in list(mine.items())[:count]]
            while True:
                first = s.entries[0][0] if s.entries else s.next
                start = max(0, s.delivered + 1 - first)
                new = [(f"{n}-0", r) for n, r in s.entries[start:start + count]]
                if new or (left := deadline - time.monotonic()) <= 0:
                    break
                self._cond.wait(left)
            for i, r in new:
                mine[i] = r
                s.delivered = int(i.split("-")[0])
            return [Message(i, r) for i, r in new]

    def ack(self, experiment, ids):
        with self._cond:
            s = self._streams.get(experiment)
            if s:
                for mine in s.pending.values():
                    for i in ids:
                        mine.pop(i, None)

    def decide(self, experiment, decisions: Sequence[tuple[int, int, Decision]]):
        with self._cond:
            for trial, seq, d in decisions:
                q = self._decisions.setdefault((experiment, trial), deque(maxlen=self.decisions_kept))
                q.append((seq, d))
            self._cond.notify_all()

    def backlog(self, experiment):
        with self._cond:
            s = self._streams.get(experiment)
            return [Message(f"{n}-0", r) for n, r in s.entries] if s else []

    def last_id(self, experiment):
        with self._cond:
            s = self._streams.get(experiment)
            return f"{s.next - 1}-0" if s and s.next > 1 else None

    def delete_experiment(self, experiment):
        with self._cond:
            self._streams.pop(experiment, None)
            for key in [k for k in self._decisions if k[0] == experiment]:
                del self._decisions[key]

    def experiments(self) -> set[str]:
        """What it holds anything for (tests check delete_experiment with it)."""
        with self._cond:
            return set(self._streams) | {k[0] for k in self._decisions}
