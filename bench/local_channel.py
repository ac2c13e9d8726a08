"""Should the default local channel go through the in-memory bus? The socket channel straight into the
runner's event queue (today's default) vs. the same socket with each connection's thread acting as the
trial's bus client: MemoryBus -> SchedulerLoop (runtime/bridge.py) -> event queue.

    python bench/local_channel.py

N trial processes (forked) each send R reports over the real Unix socket with the SDK's _Channel and
wait for each answer; a thread plays the runner's main loop (take what is queued, answer `continue`;
the engine's own work is the same either way and left out). Reports/s and per-report latency.

On a 2-core VM (2026-11-27):
    socket trials=1:    12959 reports/s, median     72 us, p99    168 us
    bus    trials=1:     7895 reports/s, median    107 us, p99    270 us
    socket trials=8:    15161 reports/s, median    350 us, p99   2191 us
    bus    trials=8:     5942 reports/s, median   1268 us, p99   3969 us
The loop hands reports to its handler one at a time, each a round trip to the main thread, where the
socket's threads post concurrently and the main loop answers all that is queued in one pass: so the
default stays on the socket (see runtime/local.py).
"""
import json
import multiprocessing as mp
import queue
import statistics
import threading
import time

from kubetune.api.trial import CONTINUE
from kubetune.bus import MemoryBus, Report
from kubetune.runtime.bridge import BusBridge
from kubetune.runtime.channel import ReportChannel
from kubetune.runtime.events import Reported
from kubetune.trial import _Channel

_mp = mp.get_context("fork")


class BusChannel(ReportChannel):
    """The prototype: each socket connection's thread is that trial's bus client."""

    def __init__(self, events, bus, key):
        self.bus, self.key, self.seqs, self.lock = bus, key, {}, threading.Lock()
        super().__init__(events)

    def _answer(self, raw):
        msg = json.loads(raw)
        n = int(msg["trial"])
        with self.lock:
            seq = self.seqs[n] = self.seqs.get(n, 0) + 1
        self.bus.publish(self.key, [Report(n, seq, msg.get("step"), msg["metrics"])])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for s, d in self.bus.take_decisions(self.key, n, block_s=deadline - time.monotonic()):
                if s == seq and not d.wait:
                    return d.to_dict() | {"action": d.action}
        return {"action": "continue"}


def main_loop(events, stop):
    """The runner's main loop, less the engine: everything queued is answered in one pass."""
    while not stop.is_set():
        got = []
        try:
            got.append(events.get(timeout=0.2))
            while True:
                got.append(events.get_nowait())
        except queue.Empty:
            pass
        for ev in got:
            if isinstance(ev, Reported) and ev.reply:
                ev.reply(CONTINUE)


def trial(path, n, reports, go, out):
    c = _Channel(path, n)
    lat = []
    go.wait()
    for i in range(reports):
        t = time.perf_counter()
        c.send(i + 1, {"loss": 1.0 / (i + 1)})
        lat.append(time.perf_counter() - t)
    out.put(lat)


def run(mode, trials, reports):
    events, stop, bridge = queue.Queue(), threading.Event(), None
    if mode == "socket":
        ch = ReportChannel(events)
    else:
        bus = MemoryBus()
        bridge = BusBridge(bus, "k", events)
        bridge.start()
        ch = BusChannel(events, bus, "k")
    m = threading.Thread(target=main_loop, args=(events, stop), daemon=True)
    m.start()
    out, go = _mp.Queue(), _mp.Event()
    procs = [_mp.Process(target=trial, args=(ch.path, n, reports, go, out)) for n in range(trials)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # all connected and waiting
    t0 = time.perf_counter()
    go.set()
    lat = [x for _ in procs for x in out.get()]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    stop.set()
    m.join()
    ch.close()
    if bridge:
        bridge.close()
    lat.sort()
    return trials * reports / elapsed, statistics.median(lat) * 1e6, lat[int(len(lat) * .99)] * 1e6


if __name__ == "__main__":
    for trials, reports in [(1, 2000), (8, 500)]:
        for mode in ["socket", "bus"]:
            best = max(run(mode, trials, reports) for _ in range(3))
            print(f"{mode:6s} trials={trials}: {best[0]:8.0f} reports/s, median {best[1]:6.0f} us, "
                  f"p99 {best[2]:6.0f} us")
