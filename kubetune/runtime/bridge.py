"""The metric bus in a local run: trials report over Redis Streams, as pods do.

`kubetune run --redis URL` starts trial processes whose SDK publishes to the
experiment's stream (KUBETUNE_REDIS_URL, KUBETUNE_BUS_KEY). The runner hosts the
same SchedulerLoop as the cluster's suggestion service, on a thread; its handler
bridges each report into the engine, which is single-threaded and lives on the
runner's main loop: it posts a Reported event to the runtime's event queue and
waits for the engine's answer.

A held answer (synchronous PBT: the engine answers `wait`) goes back to the loop
as `wait`; the real decision, made later on the main thread, is queued here and
written by the loop thread (`released`, asked after each batch and whenever the
bus is quiet), so that the main loop never waits on the network for it.

No persist hook: a local run records trials in its state store as they change,
and re-runs a trial cut short from scratch, so a report acknowledged before its
trial's record is saved is never needed again.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from ..api.trial import CONTINUE, Decision
from ..bus import Message, MetricBus, SchedulerLoop, experiment_key
from ..bus.base import position
from .events import Reported, Wake

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 60.0  # the engine answers within one pass of the main loop; this only bounds a stuck one
RUN_ID_KEY = "bus_run"  # in the experiment's state: names its stream, the same across resumes


class BusUnreachable(RuntimeError):
    pass


def redacted(url: str) -> str:
    """The URL without its password (it is shown in errors)."""
    try:
        parts = urlsplit(url)
        if parts.password:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        pass
    return url


def connect_redis(url: str, password: str | None = None, ca_file: str | None = None,
                  timeout_s: float = 5.0) -> MetricBus:
    """A RedisBus for `url` that has answered a PING; BusUnreachable (naming the URL) otherwise.
    ca_file: the CA that signed the server's certificate (rediss://), when not one the system trusts."""
    try:
        import redis

        from ..bus.redis_streams import RedisBus, connect

        with connect(url, password=password, ca_file=ca_file, timeout_s=timeout_s, retries=1) as client:
            client.ping()
    except ImportError as e:
        raise BusUnreachable(f"--redis needs redis-py: {e}") from None
    except (ValueError, redis.RedisError, OSError) as e:
        raise BusUnreachable(f"cannot reach Redis at {redacted(url)}: {e}") from None
    # The bus the loop uses retries more (a Redis restart mid-run is ridden out).
    return RedisBus(connect(url, password=password, ca_file=ca_file, timeout_s=timeout_s))


def bus_key(spec_name: str, state: dict) -> str:
    """`local/<experiment>/<run id>`: the run id is made once and kept in the state, so that a
    resumed run (or a state written before runs had one, given one now) reads the same stream."""
    if not state.get(RUN_ID_KEY):
        state[RUN_ID_KEY] = secrets.token_hex(6)
    return experiment_key("local", spec_name, state[RUN_ID_KEY])


class _Loop(SchedulerLoop):
    """The scheduler loop, telling the runtime when it has handled more of the stream."""

    def __init__(self, *args, on_progress=None, **kw):
        super().__init__(*args, **kw)
        self.on_progress = on_progress

    def run_once(self, block_s: float = 0.1) -> int:
        n = super().run_once(block_s)
        if n and self.on_progress is not None:
            self.on_progress()
        return n

    def handled_position(self) -> tuple[int, int]:
        """Stream position of the newest report handled and acknowledged."""
        with self._progress:
            return self._handled_upto


class _Request:
    __slots__ = ("answer", "abandoned")

    def __init__(self):
        self.answer: Decision | None = None
        self.abandoned = False


class BusBridge:
    """Hosts a SchedulerLoop on `key` that feeds reports into the runtime's event queue."""

    def __init__(self, bus: MetricBus, key: str, events: queue.Queue, *, block_s: float = 0.05,
                 answer_timeout: float = ANSWER_TIMEOUT):
        self.bus, self.key, self.events = bus, key, events
        self.answer_timeout = answer_timeout
        self._cond = threading.Condition()
        self._late: list[tuple[int | str, int, Decision]] = []  # held decisions made now, for the loop to write
        self._closed = False
        self._stop = threading.Event()
        self.wake_wanted = False  # set by the runtime while it holds an exit back for the loop
        self.loop = _Loop(bus, key, self._handle, released=self._released, on_progress=self._progressed)
        self._errors = 0
        self._thread = threading.Thread(target=self.loop.run, args=(self._stop, block_s, self._error),
                                        name="bus-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the loop thread -------------------------------------------------------

    def _handle(self, msg: Message) -> Decision:
        r = msg.report
        req = _Request()

        def reply(decision: Decision) -> None:  # on the main thread
            with self._cond:
                if req.answer is None and not req.abandoned:
                    req.answer = decision
                    self._cond.notify_all()
                elif not decision.wait:
                    # The decision on a report answered `wait` earlier: the trial's client is holding for it.
                    self._late.append((r.address, r.seq, decision))

        self.events.put(Reported(r.trial, dict(r.metrics), r.step, reply, resent_ok=True, attempt=r.attempt))
        deadline = time.monotonic() + self.answer_timeout
        with self._cond:
            while req.answer is None and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if req.answer is None:
                req.abandoned = True  # a late answer is written as a released one
                return CONTINUE
            return req.answer

    def _released(self) -> list[tuple[int | str, int, Decision]]:
        with self._cond:
            late, self._late = self._late, []
        return late

    def _progressed(self) -> None:
        self._errors = 0  # the bus is back: the next outage is logged again
        if self.wake_wanted:
            self.events.put(Wake())

    def _error(self, e: Exception) -> None:
        self._errors += 1
        if self._errors == 1 or self._errors % 100 == 0:
            log.warning("metric bus %s: %r (retrying)", self.key, e)

    # -- the main thread ---------------------------------------------------------

    def last_id(self) -> tuple[int, int] | None:
        """Stream position of the newest report published so far; None if the bus cannot tell now."""
        try:
            last = self.bus.last_id(self.key)
        except Exception:  # noqa: BLE001 - the bus is down: the caller asks again later
            return None
        return (0, 0) if last is None else position(last)

    def handled(self, target: tuple[int, int]) -> bool:
        return self.loop.handled_position() >= target

    def close(self, delete: bool = True) -> None:
        """Stops the loop thread (answering any report still waiting for the engine with `continue`)
        and deletes the experiment's keys: results live in the state store."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(10.0)
        if delete:
            try:
                self.bus.delete_experiment(self.key)
            except Exception as e:  # noqa: BLE001 - a bus gone at the end costs only its keys
                log.warning("metric bus %s: keys not deleted: %r", self.key, e)
        self.bus.close()
