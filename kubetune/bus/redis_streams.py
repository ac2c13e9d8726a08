"""The Redis Streams bus.

Keys of experiment E (the braces keep them in one Redis Cluster slot):
  kubetune:{E}:reports       stream of reports, capped with MAXLEN ~ (approximate: cheap trims),
                             expiring a week after the last report (deleting an experiment removes
                             its keys; this bounds what its pods, still terminating, write after)
  kubetune:{E}:d:<address>   list of a trial's decisions (capped, expiring); the address is the
                             trial's number, "<number>.<attempt>" from its second attempt on
The scheduler loop reads the stream through the consumer group "scheduler".
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.utils import SENTINEL as _SENTINEL

from ..api.trial import Decision
from .base import GROUP, Message, MetricBus, Report, _scan, decode_decision, encode_decision, report_from_row

log = logging.getLogger(__name__)

_tuple = tuple.__new__  # builds a named tuple without the Python-level __new__
_loads = json.JSONDecoder().decode


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
                 maxlen: int = 100_000, decisions_kept: int = 64, decision_ttl_s: int = 24 * 3600,
                 stream_ttl_s: int = 7 * 24 * 3600):
        self.r = client or connect(url, password=password, tls=tls, ca_file=ca_file)
        self.maxlen = maxlen
        self.decisions_kept = decisions_kept
        self.decision_ttl_s = decision_ttl_s
        self.stream_ttl_s = stream_ttl_s
        self._groups: set[str] = set()
        self._prefixes: dict[str, bytes] = {}
        self._expires: dict[str, bytes] = {}
        self._per_trial: dict[tuple[str, int | str], tuple[bytes, bytes, bytes]] = {}
        self._popped: dict[tuple[str, int | str], list[tuple[int, Decision]]] = {}  # see _taken

    @staticmethod
    def stream_key(experiment: str) -> str:
        return f"kubetune:{{{experiment}}}:reports"

    @staticmethod
    def decision_key(experiment: str, trial: int | str) -> str:
        return f"kubetune:{{{experiment}}}:d:{trial}"

    # -- the wire ----------------------------------------------------------------
    # The hot paths (publishing, reading, answering) pack their commands themselves and send
    # each batch as one write, reading the raw replies back (hiredis when installed): redis-py's
    # pipeline spends ~5 us of Python per command building and parsing, several times what
    # Redis spends executing an XADD. Everything else goes through redis-py as usual.

    def _exchange(self, data: bytes, n: int, block_s: float = 0.0, again: Callable[[], bytes] | None = None) -> list:
        """Sends packed commands in one write and returns their n replies (one round trip).
        An error reply comes back as a ResponseError in its place; a lost connection raises
        (after the client's retries: resending is harmless, delivery is at least once).
        again: makes what a retry sends instead (as many replies), for commands not harmless twice."""
        pool = self.r.connection_pool
        conn = pool.get_connection()
        try:
            timeout = _SENTINEL if block_s <= 0 else block_s + (conn.socket_timeout or 5.0)
            sent = []

            def once():
                conn.send_packed_command((again() if sent and again is not None else data,))
                sent.append(True)
                out = []
                for _ in range(n):
                    try:
                        out.append(conn.read_response(disable_decoding=True, timeout=timeout))
                    except redis.ResponseError as e:
                        out.append(e)
                return out

            retry = getattr(conn, "retry", None)
            if retry is None:
                return once()
            return retry.call_with_retry(once, lambda _e: conn.disconnect())
        finally:
            pool.release(conn)

    def _xadd_prefix(self, experiment: str) -> bytes:
        """XADD <stream> MAXLEN ~ <n> * r, packed once: each report appends its payload."""
        p = self._prefixes.get(experiment)
        if p is None:
            p = _pack("XADD", self.stream_key(experiment), "MAXLEN", "~", self.maxlen, "*", "r")
            p = self._prefixes[experiment] = b"*8" + p[p.index(b"\r\n"):]  # 7 args + the payload
        return p

    def _adds(self, experiment: str, reports: Sequence[Report]) -> list[bytes]:
        """An XADD per report, then the stream's EXPIRE (none without reports)."""
        if not reports:
            return []
        prefix = self._xadd_prefix(experiment)
        out = []
        for r in reports:
            b = r.payload().encode()
            out.append(b"%s$%d\r\n%s\r\n" % (prefix, len(b), b))
        out.append(self._expire(experiment))
        return out

    def _expire(self, experiment: str) -> bytes:
        p = self._expires.get(experiment)
        if p is None:
            p = self._expires[experiment] = _pack("EXPIRE", self.stream_key(experiment), self.stream_ttl_s)
        return p

    # -- trial side ------------------------------------------------------------

    def publish(self, experiment, reports):
        if reports:
            adds = self._adds(experiment, reports)
            _raise_first(self._exchange(b"".join(adds), len(adds)))

    def take_decisions(self, experiment, trial, block_s=0.0):
        return self.publish_and_wait(experiment, (), trial, block_s)

    def publish_and_take(self, experiment, reports, trial):
        return self.publish_and_wait(experiment, reports, trial, 0.0)

    def publish_and_wait(self, experiment, reports, trial, block_s):
        """XADDs, then the trial's waiting decisions, in one round trip; with block_s > 0 the
        server holds the reply (BLPOP) until a decision is pushed, so waiting costs no polling."""
        key = self.decision_key(experiment, trial)
        parts = self._adds(experiment, reports)
        if block_s <= 0 or (experiment, trial) in self._popped:
            replies = self._exchange(b"".join(parts + [_pack("LPOP", key, self.decisions_kept)]), len(parts) + 1)
            _raise_first(replies[-1:])
            return self._taken(experiment, trial, replies[:-1], replies[-1] or [])
        deadline = time.monotonic() + block_s
        while True:
            left = max(0.001, deadline - time.monotonic())
            # BLPOP waits for the first decision, the LPOP right behind it takes any others.
            tail = [_pack("BLPOP", key, f"{left:.3f}"), _pack("LPOP", key, self.decisions_kept - 1)]
            replies = self._exchange(b"".join(parts + tail), len(parts) + 2, left)
            first, rest = _raise_first(replies[-2:])
            if first or rest:  # (rest alone: pushed just as BLPOP gave up; popped all the same)
                return self._taken(experiment, trial, replies[:-2], [*(first[1:] if first else ()), *(rest or [])])
            _raise_first(replies[:-2])
            if time.monotonic() >= deadline:
                return []
            parts = []

    def _taken(self, experiment, trial, adds: list, raw: list) -> list[tuple[int, Decision]]:
        """The decisions popped in a round trip with XADDs. If an XADD failed (Redis out of memory
        refuses writes, yet pops), the caller keeps its reports and gets an error, so the decisions,
        already gone from Redis, are kept here and handed out by the trial's next take."""
        got = self._popped.pop((experiment, trial), []) + [decode_decision(r) for r in raw]
        try:
            _raise_first(adds)
        except redis.ResponseError:
            if got:
                self._popped[(experiment, trial)] = got
            raise
        return got

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

    def _xreadgroup(self, experiment, consumer, count, block_s, pending) -> tuple[bytes, float]:
        args = ["XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count]
        block = 0.0 if pending or block_s <= 0 else max(0.001, block_s)
        if block:
            args += ["BLOCK", max(1, int(block * 1000))]
        return _pack(*args, "STREAMS", self.stream_key(experiment), "0" if pending else ">"), block

    def _reread(self, experiment, consumer, count) -> bytes:
        """What a retried read of new reports sends: XREADGROUP > is not harmless twice. If the first
        one ran and its reply was lost, its entries are pending under the consumer, and a second would
        skip them (read by no one until a restart); reading this consumer's pending entries instead
        returns them. (The loop reads new reports only with none of its own left unacknowledged.)"""
        return self._xreadgroup(experiment, consumer, count, 0.0, True)[0]

    def read(self, experiment, consumer, count=256, block_s=0.0, pending=False):
        self._ensure_group(experiment)
        cmd, block = self._xreadgroup(experiment, consumer, count, block_s, pending)
        again = None if pending else lambda: self._reread(experiment, consumer, count)
        while True:
            got = self._exchange(cmd, 1, block, again)[0]
            msgs = self._messages(experiment, got)
            # A batch of nothing but skipped entries (now acknowledged) is not the end of the
            # stream, nor of this consumer's pending reports: read on.
            if msgs or not _entries(got):
                return msgs

    def _messages(self, experiment, got) -> list[Message]:
        if isinstance(got, redis.ResponseError):
            if "NOGROUP" not in str(got):
                raise got
            self._ensure_group(experiment, force=True)  # Redis restarted without its data
            return []
        out, bad = [], []
        # RESP3 (redis-py's default) answers a map of stream -> entries, RESP2 a list of pairs.
        for _, entries in (got.items() if isinstance(got, dict) else got or []):
            rows = _rows(entries)
            if rows is not None:  # the usual batch: this runs once per report
                try:
                    out += [_tuple(Message, (mid.decode(), _tuple(Report, (trial, seq, None if step is None
                                                                          else float(step), metrics, attempt))))
                            for (mid, _), (trial, seq, step, metrics, attempt) in zip(entries, rows)]
                    continue
                except (TypeError, ValueError):  # a payload of another shape: entry by entry
                    pass
            for mid, fields in entries:
                if not fields:  # a pending entry trimmed away comes back empty: nothing to handle
                    bad.append(mid.decode())
                    continue
                try:
                    if fields[0] == b"r":  # the usual entry
                        report = report_from_row(_scan(fields[1].decode(), 0)[0])
                    else:
                        report = Report.from_fields(fields)
                    _check(report)
                # (the JSON scanner raises StopIteration at text that is not JSON)
                except (IndexError, KeyError, StopIteration, TypeError, ValueError) as e:
                    bad.append(mid.decode())
                    log.warning("metric bus %s: entry %s is not a report (%s); acknowledged and skipped",
                                experiment, mid.decode(), e)
                    continue
                out.append(_tuple(Message, (mid.decode(), report)))
        if bad:
            # Acknowledged now: left pending, it would come back at every recovery read (which starts
            # at the oldest pending entry), failing the loop or hiding the pending reports behind it.
            self.ack(experiment, bad)
        return out

    def ack(self, experiment, ids):
        if ids:
            _raise_first(self._exchange(self._xack(experiment, ids), 1))

    def _xack(self, experiment, ids) -> bytes:
        if not all(i.__class__ is str and i.isascii() for i in ids):
            return _pack("XACK", self.stream_key(experiment), GROUP, *ids)
        # Stream ids are ASCII: a batch's thousand are packed as one string, then encoded once.
        head = _pack("XACK", self.stream_key(experiment), GROUP)
        body = "".join([f"${len(i)}\r\n{i}\r\n" for i in ids]).encode()
        return b"*%d%s%s" % (len(ids) + 3, head[head.index(b"\r\n"):], body)

    def _decisions(self, experiment, decisions) -> list[bytes]:
        per_trial: dict[int | str, list[str]] = {}
        for trial, seq, d in decisions:
            per_trial.setdefault(trial, []).append(encode_decision(seq, d))
        out = []
        for trial, items in per_trial.items():
            rpush, trim, expire = self._decision_commands(experiment, trial)
            values = b"".join([b"$%d\r\n%s\r\n" % (len(v), v) for v in (x.encode() for x in items)])
            out += [b"*%d\r\n%s%s" % (len(items) + 2, rpush, values), trim, expire]
        return out

    def _decision_commands(self, experiment: str, trial: int | str) -> tuple[bytes, bytes, bytes]:
        """RPUSH's name and key, packed, and the whole LTRIM and EXPIRE after it: the same every batch."""
        got = self._per_trial.get((experiment, trial))
        if got is None:
            key = self.decision_key(experiment, trial)
            rpush = _pack("RPUSH", key)
            got = self._per_trial[(experiment, trial)] = (
                rpush[rpush.index(b"\r\n") + 2:], _pack("LTRIM", key, -self.decisions_kept, -1),
                _pack("EXPIRE", key, self.decision_ttl_s))
        return got

    def decide(self, experiment, decisions: Sequence[tuple[int, int, Decision]]):
        parts = self._decisions(experiment, decisions)
        if parts:
            _raise_first(self._exchange(b"".join(parts), len(parts)))

    def decide_and_ack(self, experiment, decisions, ids):
        """The decisions, then the acknowledgement, in one write: Redis runs them in order, so
        an acknowledged report always has its decision written."""
        parts = self._decisions(experiment, decisions)
        if ids:
            parts.append(self._xack(experiment, ids))
        if parts:
            _raise_first(self._exchange(b"".join(parts), len(parts)))

    def decide_ack_read(self, experiment, decisions, ids, consumer, count=256, block_s=0.0):
        """Decisions, XACK and the next XREADGROUP in one write: while the loop is busy it never
        waits a round trip between answering a batch and taking the next."""
        self._ensure_group(experiment)
        parts = self._decisions(experiment, decisions)
        if ids:
            parts.append(self._xack(experiment, ids))
        cmd, block = self._xreadgroup(experiment, consumer, count, block_s, False)
        replies = self._exchange(b"".join(parts + [cmd]), len(parts) + 1, block,
                                 lambda: b"".join(parts + [self._reread(experiment, consumer, count)]))
        _raise_first(replies[:-1])
        return self._messages(experiment, replies[-1])

    def backlog(self, experiment):
        got = self.r.xrange(self.stream_key(experiment))
        return [Message(mid.decode(), Report.decode(f)) for mid, f in got]

    def last_id(self, experiment):
        got = self.r.xrevrange(self.stream_key(experiment), count=1)
        return got[0][0].decode() if got else None

    # -- lifecycle -----------------------------------------------------------------

    def keys(self, experiment: str) -> list[str]:
        pattern = f"kubetune:{{{_glob_escape(experiment)}}}:*"
        return sorted(k.decode() for k in self.r.scan_iter(match=pattern, count=1000))

    def delete_experiment(self, experiment):
        keys = self.keys(experiment)
        for i in range(0, len(keys), 500):
            self.r.delete(*keys[i:i + 500])
        self._groups.discard(experiment)
        for k in [k for k in self._per_trial if k[0] == experiment]:
            del self._per_trial[k]
        self._prefixes.pop(experiment, None)
        self._expires.pop(experiment, None)

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


def _entries(got) -> bool:
    """Whether an XREADGROUP reply holds any entry (RESP3: a map, RESP2: a list of pairs)."""
    if isinstance(got, redis.ResponseError) or not got:
        return False
    return any(entries for _, entries in (got.items() if isinstance(got, dict) else got))


def _check(r: Report) -> None:
    """Raises TypeError unless the report has the types the scheduler loop relies on."""
    if not (isinstance(r.trial, int) and isinstance(r.seq, int) and isinstance(r.metrics, dict)
            and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in r.metrics.items())):
        raise TypeError("expected an integer trial and seq and a mapping of metric names to numbers")


def _rows(entries: list) -> list | None:
    """Every entry's payload ([trial, seq, step, metrics]) parsed in one call of the JSON decoder:
    a quarter less work per entry than one call each. None when some entry is not a plain payload
    (a trimmed pending entry, other fields) or one does not parse: those go one by one."""
    try:
        payloads = [fields[1] for _, fields in entries if fields[0] == b"r" and len(fields) == 2]
        if len(payloads) != len(entries):
            return None
        rows = _loads((b"[%s]" % b",".join(payloads)).decode())
    except (IndexError, TypeError, ValueError):
        return None
    return rows if len(rows) == len(entries) else None  # a payload of two values would shift the rest


def _pack(*args) -> bytes:
    """One command in the Redis protocol (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _raise_first(replies: list) -> list:
    for r in replies:
        if isinstance(r, redis.ResponseError):
            raise r
    return replies


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
