"""The Redis Streams bus.

Keys of experiment E (the braces keep them in one Redis Cluster slot):
  kubetune:{E}:reports       stream of reports, capped with MAXLEN ~ (approximate: cheap trims),
                             expiring a week after the last report (deleting an experiment removes
                             its keys; this bounds what its pods, still terminating, write after)
  kubetune:{E}:ds:<address>  stream of a trial's decisions (capped, expiring); the address is the
                             trial's number, "<number>.<attempt>" from its second attempt on
The scheduler loop reads the stream through the consumer group "scheduler".

A trial reads its decisions from the last entry id it has seen (XREAD) and trims what it has seen
(XTRIM MINID) in its next round trip: both are harmless twice, so a round trip whose reply was lost
(the connection dropped after Redis ran it) is sent again and returns the same decisions. A list
popped with LPOP lost them: the pop sent again found nothing, and an exploit is never repeated.
(The key is not the "d:" list that clients before streams pop: a trial image built with such an
SDK, which outlives scheduler versions, then finds no decisions rather than a WRONGTYPE error at
every report, which made it keep and resend all its reports.)
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
from .base import GROUP, Message, MetricBus, Report, _scan, decode_decisions, encode_decision, report_from_row

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
        self._per_trial: dict[tuple[str, int | str], tuple[bytes, bytes]] = {}
        # A trial's decision stream as this client has read it: (the id of the last entry read, whether
        # the entries up to it are trimmed away); see publish_and_wait.
        self._cursors: dict[tuple[str, int | str], tuple[bytes, bool]] = {}
        self._reads: dict[tuple[str, int | str], bytes] = {}  # see _xread

    @staticmethod
    def stream_key(experiment: str) -> str:
        return f"kubetune:{{{experiment}}}:reports"

    @staticmethod
    def decision_key(experiment: str, trial: int | str) -> str:
        return f"kubetune:{{{experiment}}}:ds:{trial}"

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
        """XADDs, then the trial's decisions after the last one read, in one round trip; with
        block_s > 0 the server holds the reply (XREAD BLOCK) until a decision is written, so waiting
        costs no polling. Nothing in it changes what a second send returns: the XADDs are applied
        once by the scheduler, the trim removes only entries already read, and the read starts where
        the last reply that arrived left off. A round trip whose reply was lost is sent again by the
        client's retry (see _exchange) and returns the same decisions."""
        at = (experiment, trial)
        adds = self._adds(experiment, reports)
        if block_s <= 0:
            last, trim = self._trim(experiment, trial)
            replies = self._exchange(b"".join(adds + trim) + self._xread(experiment, trial, last), len(adds) + len(trim) + 1)
            return self._taken(at, last, replies, len(adds))
        deadline = time.monotonic() + block_s
        key = self.decision_key(experiment, trial)
        while True:
            last, trim = self._trim(experiment, trial)
            left = max(0.001, deadline - time.monotonic())
            read = _pack("XREAD", "COUNT", self.decisions_kept, "BLOCK", max(1, int(left * 1000)), "STREAMS", key, last)
            replies = self._exchange(b"".join(adds + trim) + read, len(adds) + len(trim) + 1, left)
            got = self._taken(at, last, replies, len(adds))
            if got or time.monotonic() >= deadline:
                return got
            adds = []

    def _trim(self, experiment: str, trial: int | str) -> tuple[bytes, list[bytes]]:
        """Where the trial's next read starts, and the XTRIM removing the entries before it if they
        may still be there (those handed out by the last reply that arrived)."""
        last, trimmed = self._cursors.get((experiment, trial), _START)
        if trimmed:
            return last, []
        return last, [_pack("XTRIM", self.decision_key(experiment, trial), "MINID", _after(last))]

    def _xread(self, experiment: str, trial: int | str, last: bytes) -> bytes:
        """XREAD COUNT <decisions_kept> STREAMS <key> <last>, its head packed once per trial."""
        head = self._reads.get((experiment, trial))
        if head is None:
            head = _pack("XREAD", "COUNT", self.decisions_kept, "STREAMS", self.decision_key(experiment, trial))
            head = self._reads[(experiment, trial)] = b"*6" + head[head.index(b"\r\n"):]  # 5 args + the id
        return b"%s$%d\r\n%s\r\n" % (head, len(last), last)

    def _taken(self, at, last: bytes, replies: list, n_adds: int) -> list[tuple[int, Decision]]:
        """The decisions in a round trip's last reply (an XREAD from `last`), after its n_adds XADD
        replies and a trim's, if one was sent. The cursor moves past them only when every XADD
        succeeded: if one failed (Redis out of memory refuses writes, yet reads), the caller keeps its
        reports and gets an error, and its next take, reading from the same place, returns these
        decisions again. A trim that failed is sent again with the next read."""
        read = replies[-1]
        if isinstance(read, redis.ResponseError):
            raise read
        entries = _stream_entries(read)
        got = _decoded(entries, at)
        _raise_first(replies[:n_adds])
        if entries:
            self._cursors[at] = (entries[-1][0], False)
        elif len(replies) > n_adds + 1 and not isinstance(replies[n_adds], redis.ResponseError):
            self._cursors[at] = (last, True)
        return got

    def skip_decisions(self, experiment, trial):
        """Reads on from the newest decision written so far: those before it are never returned."""
        newest = self.r.xrevrange(self.decision_key(experiment, trial), count=1)
        if newest:
            self._cursors[(experiment, trial)] = (newest[0][0], False)

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
        """Per trial, one XADD of the batch's decisions to it (one entry: a JSON array of at most
        decisions_kept, the latest) and the key's EXPIRE."""
        per_trial: dict[int | str, list[str]] = {}
        for trial, seq, d in decisions:
            per_trial.setdefault(trial, []).append(encode_decision(seq, d))
        out = []
        for trial, items in per_trial.items():
            xadd, expire = self._decision_commands(experiment, trial)
            if len(items) > self.decisions_kept:
                items = items[-self.decisions_kept:]
            value = ("[%s]" % ",".join(items)).encode()
            out += [b"%s$%d\r\n%s\r\n" % (xadd, len(value), value), expire]
        return out

    def _decision_commands(self, experiment: str, trial: int | str) -> tuple[bytes, bytes]:
        """XADD <key> MAXLEN <decisions_kept> * d, packed (the value follows), and the key's EXPIRE:
        the same every batch."""
        got = self._per_trial.get((experiment, trial))
        if got is None:
            key = self.decision_key(experiment, trial)
            xadd = _pack("XADD", key, "MAXLEN", self.decisions_kept, "*", "d")
            got = self._per_trial[(experiment, trial)] = (
                b"*7" + xadd[xadd.index(b"\r\n"):], _pack("EXPIRE", key, self.decision_ttl_s))
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
        for cache in (self._per_trial, self._cursors, self._reads):
            for k in [k for k in cache if k[0] == experiment]:
                del cache[k]
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


_START = (b"0-0", True)  # a trial's stream not read yet: from its start, nothing to trim


def _after(entry_id: bytes) -> bytes:
    """The smallest stream id after `entry_id` (XTRIM MINID keeps ids from it on)."""
    ms, _, seq = entry_id.partition(b"-")
    return b"%s-%d" % (ms, int(seq or 0) + 1)


def _stream_entries(got) -> list:
    """The entries of an XREAD reply on one stream (RESP3: a map of key -> entries, RESP2: a list of
    [key, entries] pairs; None: nothing new)."""
    if not got:
        return []
    return next(iter(got.values())) if isinstance(got, dict) else got[0][1]


def _decoded(entries: list, at) -> list[tuple[int, Decision]]:
    """The decisions in a trial's decision-stream entries, oldest first. An entry that holds none (not
    written by this bus) is logged and passed over: the trial's reads go on after it."""
    out = []
    for mid, fields in entries:
        try:
            out += decode_decisions(fields[fields.index(b"d") + 1])
        except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("metric bus %s: decision entry %s of trial %s is not decisions (%s); passed over",
                        at[0], mid.decode(), at[1], e)
    return out


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
