"""The Redis Streams bus.

Keys of experiment E (the braces keep them in one Redis Cluster slot):
  kubetune:{E}:reports       stream of reports, capped with MAXLEN ~ (approximate: cheap trims)
  kubetune:{E}:d:<trial>     list of that trial's decisions (capped, expiring)
The scheduler loop reads the stream through the consumer group "scheduler".
"""

from __future__ import annotations

import time
from typing import Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..api.trial import Decision
from .base import GROUP, Message, MetricBus, Report, decode_decision, encode_decision


def connect(url: str = "redis://127.0.0.1:6379/0", *, password: str | None = None, tls: bool | None = None,
            ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
            timeout_s: float = 5.0, retries: int = 3) -> redis.Redis:
    """A client for `url` (redis:// or rediss://); tls=True forces TLS, ca_file etc. verify it."""
    kw = dict(password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
              retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), retries),
              retry_on_error=[redis.ConnectionError, redis.TimeoutError], health_check_interval=30)
    if tls or url.startswith("rediss://"):
        if url.startswith("redis://"):
            url = "rediss://" + url[len("redis://"):]
        kw.update(ssl_ca_certs=ca_file, ssl_certfile=cert_file, ssl_keyfile=key_file)
    return redis.Redis.from_url(url, **{k: v for k, v in kw.items() if v is not None})


class RedisBus(MetricBus):
    def __init__(self, client: redis.Redis | None = None, *, url: str = "redis://127.0.0.1:6379/0",
                 password: str | None = None, tls: bool | None = None, ca_file: str | None = None,
                 maxlen: int = 100_000, decisions_kept: int = 64, decision_ttl_s: int = 24 * 3600):
        self.r = client or connect(url, password=password, tls=tls, ca_file=ca_file)
        self.maxlen = maxlen
        self.decisions_kept = decisions_kept
        self.decision_ttl_s = decision_ttl_s
        self._groups: set[str] = set()

    @staticmethod
    def stream_key(experiment: str) -> str:
        return f"kubetune:{{{experiment}}}:reports"

    @staticmethod
    def decision_key(experiment: str, trial: int) -> str:
        return f"kubetune:{{{experiment}}}:d:{trial}"

    # -- trial side ------------------------------------------------------------

    def _add(self, pipe, experiment, reports):
        key = self.stream_key(experiment)
        for r in reports:
            pipe.xadd(key, r.encode(), maxlen=self.maxlen, approximate=True)

    def publish(self, experiment, reports):
        if not reports:
            return
        pipe = self.r.pipeline(transaction=False)
        self._add(pipe, experiment, reports)
        pipe.execute()

    def take_decisions(self, experiment, trial, block_s=0.0):
        key = self.decision_key(experiment, trial)
        pipe = self.r.pipeline(transaction=False)
        pipe.lpop(key, self.decisions_kept)
        first = pipe.execute()[0]
        if not first and block_s > 0:
            got = self.r.blpop([key], timeout=block_s)  # redis >= 6 takes fractional seconds
            if got:
                first = [got[1]]  # any later ones come with the next call
        return [decode_decision(raw) for raw in first or []]

    def publish_and_take(self, experiment, reports, trial):
        pipe = self.r.pipeline(transaction=False)
        self._add(pipe, experiment, reports)
        pipe.lpop(self.decision_key(experiment, trial), self.decisions_kept)
        got = pipe.execute()[-1]
        return [decode_decision(raw) for raw in got or []]

    # -- scheduler side ----------------------------------------------------------

    def _ensure_group(self, experiment: str, force: bool = False) -> None:
        if experiment in self._groups and not force:
            return
        try:
            # From the start of the stream: a group made after a Redis loss reads what came since.
            self.r.xgroup_create(self.stream_key(experiment), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(experiment)

    def read(self, experiment, consumer, count=256, block_s=0.0, pending=False):
        self._ensure_group(experiment)
        key = self.stream_key(experiment)
        block = None if pending or block_s <= 0 else max(1, int(block_s * 1000))
        try:
            got = self.r.xreadgroup(GROUP, consumer, {key: "0" if pending else ">"}, count=count, block=block)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._ensure_group(experiment, force=True)  # Redis restarted without its data
            return []
        out = []
        for _, entries in got or []:
            for mid, fields in entries:
                if fields:  # a pending entry trimmed away comes back empty
                    out.append(Message(mid.decode() if isinstance(mid, bytes) else mid, Report.decode(fields)))
        return out

    def ack(self, experiment, ids):
        if ids:
            self.r.xack(self.stream_key(experiment), GROUP, *ids)

    def decide(self, experiment, decisions: Sequence[tuple[int, int, Decision]]):
        if not decisions:
            return
        per_trial: dict[int, list[str]] = {}
        for trial, seq, d in decisions:
            per_trial.setdefault(trial, []).append(encode_decision(seq, d))
        pipe = self.r.pipeline(transaction=False)
        for trial, items in per_trial.items():
            key = self.decision_key(experiment, trial)
            pipe.rpush(key, *items)
            pipe.ltrim(key, -self.decisions_kept, -1)
            pipe.expire(key, self.decision_ttl_s)
        pipe.execute()

    def backlog(self, experiment):
        got = self.r.xrange(self.stream_key(experiment))
        return [Message(mid.decode(), Report.decode(f)) for mid, f in got]

    # -- lifecycle -----------------------------------------------------------------

    def keys(self, experiment: str) -> list[str]:
        pattern = f"kubetune:{{{_glob_escape(experiment)}}}:*"
        return sorted(k.decode() for k in self.r.scan_iter(match=pattern, count=1000))

    def delete_experiment(self, experiment):
        keys = self.keys(experiment)
        for i in range(0, len(keys), 500):
            self.r.delete(*keys[i:i + 500])
        self._groups.discard(experiment)

    def close(self):
        self.r.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Blocks until the server answers PING (after a restart), or raises."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.r.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
