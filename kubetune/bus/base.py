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
    attempt: int = 1  # the trial's run (a lost pod's trial runs again as attempt 2, ...)

    @property
    def address(self) -> int | str:
        return address(self.trial, self.attempt)

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
        return report_from_row(_scan(raw.decode() if isinstance(raw, bytes) else raw, 0)[0])

    @classmethod
    def from_fields(cls, fields: list) -> "Report":
        """From a stream entry's raw field list [name, value, ...]."""
        if fields[0] == b"r":
            return cls.from_payload(fields[1])
        return cls.decode(dict(zip(fields[::2], fields[1::2])))


def experiment_key(namespace: str, name: str, uid: str = "") -> str:
    """An experiment's name on the bus. With its uid: an experiment deleted and created again under
    the same name gets new keys, so the new one never reads what the old one's pods (still
    terminating) report, and their trial numbers, which start at 0 again, cannot mix."""
    return f"{namespace}/{name}/{uid}" if uid else f"{namespace}/{name}"


def address(trial: int, attempt: int = 1) -> int | str:
    """Where a trial's decisions go: its number, and "number.attempt" from its second attempt on. A
    retried trial's earlier pod may still be running (its node cut off, the API object force-deleted):
    sharing one queue, each would take the other's decisions."""
    return trial if attempt == 1 else f"{trial}.{attempt}"


def number_of(address: int | str) -> int:
    """The trial number an address belongs to."""
    return address if isinstance(address, int) else int(address.partition(".")[0])


def report_from_row(row: list) -> "Report":
    """A report from its payload [trial, seq, step, metrics, attempt] (clients before attempts
    were sent: no attempt, the first)."""
    step = row[2]
    if len(row) == 4:
        return _tuple(Report, (row[0], row[1], None if step is None else float(step), row[3], 1))
    trial, seq, _, metrics, attempt = row
    if not isinstance(attempt, int) or attempt < 1:
        raise TypeError(f"attempt must be a positive integer, got {attempt!r}")
    return _tuple(Report, (trial, seq, None if step is None else float(step), metrics, attempt))


_tuple = tuple.__new__  # builds a named tuple without the Python-level __new__

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


def decode_decisions(raw) -> list[tuple[int, Decision]]:
    """Decisions encoded together: a JSON array of encode_decision()'s objects."""
    out = []
    for d in json.loads(raw):
        seq = d.pop("seq")
        out.append((seq, Decision.from_dict(d)))
    return out


class MetricBus:
    """What both implementations provide. `experiment` is the experiment's key (experiment_key())."""

    # -- trial side --------------------------------------------------------
    def publish(self, experiment: str, reports: Sequence[Report]) -> None:
        raise NotImplementedError

    # `trial` below is a decision queue's address (see address()): the trial number for a first attempt.
    def take_decisions(self, experiment: str, trial: int | str, block_s: float = 0.0) -> list[tuple[int, Decision]]:
        """Takes the decisions waiting for a trial, oldest first; waits up to block_s for one. A decision
        is handed out once, even when a round trip's reply is lost on the way and sent again: this bus
        object remembers what it took (another one, in a new process, starts with skip_decisions)."""
        raise NotImplementedError

    def skip_decisions(self, experiment: str, trial: int | str) -> None:
        """Passes over the decisions waiting for a trial: a later take returns only those written after.
        (A new run of a trial starts so: what is waiting answers an earlier run's reports.)"""
        self.take_decisions(experiment, trial)

    def publish_and_take(self, experiment: str, reports: Sequence[Report], trial: int | str) -> list[tuple[int, Decision]]:
        """publish() then take_decisions() without blocking; one round trip where the bus can."""
        self.publish(experiment, reports)
        return self.take_decisions(experiment, trial)

    def publish_and_wait(self, experiment: str, reports: Sequence[Report], trial: int | str,
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
        """Delivers (address, seq, decision) to each trial's decision queue (Report.address)."""
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
