"""The metric bus: trials publish reports, the scheduler loop answers with decisions.

One interface, two implementations: in-memory (one process, tests, local runs)
and Redis Streams (the cluster). Per experiment there is one report stream,
read by a consumer group, and one short decision queue per trial.

Delivery is at least once: a report is acknowledged only after its decision is
written, so a scheduler loop that dies re-reads what it had not finished
(`read(..., pending=True)`), and applying a report twice must be harmless.
The bus is not the store of record: losing it may cost in-flight intermediate
metrics, never a finished result (those live in the trial list).
"""

from __future__ import annotations

import json
from typing import NamedTuple, Sequence

from ..api.trial import Decision

GROUP = "scheduler"


# Reports and messages are named tuples: the scheduler loop makes one of each per report, and a
# tuple is built several times faster than a frozen dataclass.
class Report(NamedTuple):
    trial: int
    seq: int  # 1, 2, ... per trial and run: pairs a decision with its report
    step: float | None
    metrics: dict[str, float]

    # One field per stream entry (a compact JSON array): half the parsing of one field per value.
    def payload(self) -> str:
        return _encode(self)  # a tuple encodes as an array

    def encode(self) -> dict[str, str]:
        return {"r": self.payload()}

    @classmethod
    def decode(cls, f: dict) -> "Report":
        raw = f.get(b"r") if b"r" in f else f["r"]
        return cls.from_payload(raw)

    @classmethod
    def from_payload(cls, raw: bytes | str) -> "Report":
        # scan_once: the decoder without its two whitespace regex matches (our payloads have none).
        trial, seq, step, metrics = _scan(raw.decode() if isinstance(raw, bytes) else raw, 0)[0]
        return cls(trial, seq, None if step is None else float(step), metrics)

    @classmethod
    def from_fields(cls, fields: list) -> "Report":
        """From a stream entry's raw field list [name, value, ...]."""
        if fields[0] == b"r":
            return cls.from_payload(fields[1])
        return cls.decode(dict(zip(fields[::2], fields[1::2])))


# One encoder and decoder made once: json.dumps with separators builds a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_scan = json.JSONDecoder().scan_once


class Message(NamedTuple):
    id: str
    report: Report


def encode_decision(seq: int, decision: Decision) -> str:
    if decision.action == "continue" and not decision.reason and decision.donor is None and decision.params is None:
        return '{"seq":%d,"action":"continue"}' % seq  # the common answer, without asdict()
    return _encode({"seq": seq, **decision.to_dict()})


def decode_decision(raw) -> tuple[int, Decision]:
    d = json.loads(raw)
    seq = d.pop("seq")
    return seq, Decision.from_dict(d)


class MetricBus:
    """What both implementations provide. Experiment names are the Experiment's name."""

    # -- trial side --------------------------------------------------------
    def publish(self, experiment: str, reports: Sequence[Report]) -> None:
        raise NotImplementedError

    def take_decisions(self, experiment: str, trial: int, block_s: float = 0.0) -> list[tuple[int, Decision]]:
        """Pops the decisions waiting for a trial, oldest first; waits up to block_s for one."""
        raise NotImplementedError

    def publish_and_take(self, experiment: str, reports: Sequence[Report], trial: int) -> list[tuple[int, Decision]]:
        """publish() then take_decisions() without blocking; one round trip where the bus can."""
        self.publish(experiment, reports)
        return self.take_decisions(experiment, trial)

    def publish_and_wait(self, experiment: str, reports: Sequence[Report], trial: int,
                         block_s: float) -> list[tuple[int, Decision]]:
        """publish() then take_decisions(block_s=block_s); one round trip where the bus can."""
        self.publish(experiment, reports)
        return self.take_decisions(experiment, trial, block_s)

    # -- scheduler side ----------------------------------------------------
    def read(self, experiment: str, consumer: str, count: int = 256, block_s: float = 0.0,
             pending: bool = False) -> list[Message]:
        """New reports for the consumer group; pending=True: those this consumer read but never acked."""
        raise NotImplementedError

    def ack(self, experiment: str, ids: Sequence[str]) -> None:
        raise NotImplementedError

    def decide(self, experiment: str, decisions: Sequence[tuple[int, int, Decision]]) -> None:
        """Delivers (trial, seq, decision) to each trial's decision queue."""
        raise NotImplementedError

    def decide_and_ack(self, experiment: str, decisions: Sequence[tuple[int, int, Decision]],
                       ids: Sequence[str]) -> None:
        """decide() then ack(): a report is acknowledged only once its decision is written."""
        self.decide(experiment, decisions)
        self.ack(experiment, ids)

    def decide_ack_read(self, experiment: str, decisions: Sequence[tuple[int, int, Decision]], ids: Sequence[str],
                        consumer: str, count: int = 256, block_s: float = 0.0) -> list[Message]:
        """decide_and_ack(), then read() the next new reports; one round trip where the bus can."""
        self.decide_and_ack(experiment, decisions, ids)
        return self.read(experiment, consumer, count, block_s=block_s)

    def backlog(self, experiment: str) -> list[Message]:
        """Every report still in the stream (bounded by its maximum length), oldest first."""
        raise NotImplementedError

    def last_id(self, experiment: str) -> str | None:
        """The id of the newest report published so far (None: none yet)."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------
    def delete_experiment(self, experiment: str) -> None:
        """Removes everything the bus holds for an experiment."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def position(message_id: str) -> tuple[int, int]:
    """Stream ids ("<ms>-<seq>") in stream order."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)
