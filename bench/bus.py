"""The metric bus end to end: trial processes -> Redis Streams -> scheduler loop -> decisions.

    python bench/bus.py            # full
    python bench/bus.py --quick

Starts its own redis-server on a free loopback port (no append-only file, as
redis-benchmark runs against it) and measures, in the same run:
  1. redis-benchmark XADD (report-sized entry), 50 clients, no pipelining: the server's own rate here;
  2. ingest: many trial processes report as fast as they can through TrialClient
     (batched), one scheduler-loop process feeds an ASHA Study and writes
     decisions; rate = reports decided per second;
  3. latency: 500 concurrent trials (threads in a few processes), each reporting
     once per `interval` and waiting for its decision (wait=True); report-to-decision
     time p50/p99;
  4. what TrialClient.send_report costs the training loop per call.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import RedisServer  # noqa: E402

from kubetune.bus import SchedulerLoop, StudyHandler, TrialClient  # noqa: E402
from kubetune.bus.redis_streams import RedisBus  # noqa: E402

EXP = "bench"
PARAMS = [{"name": "lr", "type": "double", "min": 1e-4, "max": 1.0, "log": True}]
# Rungs at steps 100, 300, 900, ...: the latency trials (<= 60 reports) run through the whole
# on_report path without being stopped, so 500 stay live; the ingest trials meet rungs.
ASHA = {"name": "asha", "settings": {"resource": "step", "min": 100, "max": 10**9, "reductionFactor": 3}}


def redis_benchmark(port: int, n: int) -> float:
    """XADD of a report-sized entry by redis-benchmark (this Redis has no built-in xadd test)."""
    cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(n), "-P", "1", "-r", "100000", "--csv",
           "XADD", "rb:stream", "MAXLEN", "~", "1000000", "*", "r",
           '[__rand_int__,17,17.0,{"acc":0.5,"loss":0.1}]']
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith('"') and not line.startswith('"test"')]
    if not rows:
        raise RuntimeError(f"no result in redis-benchmark output:\n{out}")
    return float(rows[0].split('","')[1].strip('"'))


# -- the scheduler loop process -------------------------------------------------------


def loop_process(url, n_trials, ready, stop, handled):
    from kubetune import Study

    study = Study(parameters=PARAMS, goal="maximize", seed=0, early_stopping=ASHA)
    for _ in range(n_trials):
        study.ask()
    bus = RedisBus(url=url, maxlen=1_000_000)
    loop = SchedulerLoop(bus, EXP, StudyHandler(study, "acc"), count=1024)
    ready.set()
    while not stop.is_set():
        loop.run_once(block_s=0.05)
        handled.value = loop.handled


# -- trial processes --------------------------------------------------------------------


def flood_process(url, trials, seconds, start, sent):
    """Each thread is a trial reporting as fast as it can (batched client)."""
    bus = RedisBus(url=url, maxlen=1_000_000)
    counts = []

    def trial(n):
        c = TrialClient(bus, EXP, n, batch=64, flush_s=0.02)
        k = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            k += 1
            c.send_report(k, {"acc": (n % 97) / 100 + k * 1e-9})
        c.close()
        counts.append(k)

    start.wait()
    _run_threads(trial, trials)
    with sent.get_lock():
        sent.value += sum(counts)


def _run_threads(trial, numbers) -> None:
    """One thread per trial number, all at once; returns when every one has finished."""
    threads = [threading.Thread(target=trial, args=(n,)) for n in numbers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def latency_process(url, trials, reports_each, interval, start, out):
    """Each thread is a trial reporting once per interval and waiting for the decision."""
    bus = RedisBus(url=url, maxlen=1_000_000)
    lat = []
    lock = threading.Lock()

    def trial(n):
        c = TrialClient(bus, EXP, n, wait=True, wait_s=2.0)
        rng = np.random.default_rng(n)
        time.sleep(rng.random() * interval)  # spread the trials over the interval
        mine = []
        nxt = time.monotonic()
        for k in range(1, reports_each + 1):
            t0 = time.perf_counter()
            c.send_report(k, {"acc": 0.5 + (n % 13) / 100 + k * 1e-6})
            if c.decided_seq >= k:
                mine.append(time.perf_counter() - t0)
            else:
                mine.append(float("inf"))  # no answer within wait_s
            nxt += interval
            time.sleep(max(0.0, nxt - time.monotonic()))
        with lock:
            lat.extend(mine)

    start.wait()
    _run_threads(trial, trials)
    out.put(lat)


def client_cost(url, calls):
    """Microseconds per send_report in the training loop: batched, and waiting for each decision."""
    from kubetune.bus import MemoryBus

    res = {}
    for name, bus, kw in [("redis, batched (batch=64)", RedisBus(url=url), dict(batch=64, flush_s=0.05)),
                          ("memory, batched", MemoryBus(), dict(batch=64, flush_s=0.05))]:
        c = TrialClient(bus, "cost", 0, **kw)
        t0 = time.perf_counter()
        for k in range(calls):
            c.send_report(k, {"acc": 0.5, "loss": 0.1})
        c.close()
        res[name] = (time.perf_counter() - t0) / calls * 1e6
    return res


def loop_alone(url, n):
    """The scheduler loop by itself, draining a stream filled beforehand (no client competes for CPU)."""
    from kubetune import Study
    from kubetune.bus import Report

    bus = RedisBus(url=url, maxlen=10**7)
    study = Study(parameters=PARAMS, goal="maximize", seed=0, early_stopping=ASHA)
    for _ in range(64):
        study.ask()
    for t in range(64):
        bus.publish("alone", [Report(t, k, k, {"acc": 0.5 + t / 1000}) for k in range(1, n // 64 + 1)])
    loop = SchedulerLoop(bus, "alone", StudyHandler(study, "acc"), count=1024)
    t0 = time.perf_counter()
    while loop.handled < n // 64 * 64:
        loop.run_once(0.01)
    rate = loop.handled / (time.perf_counter() - t0)
    bus.delete_experiment("alone")
    return rate


def with_loop(url, n_trials, body):
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    handled = ctx.Value("q", 0)
    p = ctx.Process(target=loop_process, args=(url, n_trials, ready, stop, handled))
    p.start()
    if not ready.wait(60):
        raise RuntimeError("scheduler loop did not start")
    try:
        return body(ctx, handled)
    finally:
        stop.set()
        p.join(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="write the Markdown here too")
    a = ap.parse_args()
    seconds = 3 if a.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), appendonly=False)
        server.start()
        try:
            url = server.url
            xadd = redis_benchmark(server.port, 100_000 if a.quick else 300_000)
            subprocess.run(["redis-cli", "-p", str(server.port), "flushall"], capture_output=True, check=True)

            # 2. ingest
            n_proc, per_proc = 2, 32

            def ingest(ctx, handled):
                start, sent = ctx.Event(), ctx.Value("q", 0)
                procs = [ctx.Process(target=flood_process, args=(url, range(i * per_proc, (i + 1) * per_proc),
                                                                 seconds, start, sent)) for i in range(n_proc)]
                for p in procs:
                    p.start()
                time.sleep(2.0)  # let the interpreters start before the clock does
                h0, t0 = handled.value, time.perf_counter()
                start.set()
                for p in procs:
                    p.join()
                deadline = time.monotonic() + 120
                while handled.value - h0 < sent.value and time.monotonic() < deadline:
                    time.sleep(0.01)
                return sent.value, handled.value - h0, time.perf_counter() - t0

            sent, decided, elapsed = with_loop(url, n_proc * per_proc, ingest)
            RedisBus(url=url).delete_experiment(EXP)

            # 3. latency with 500 concurrent trials
            n_trials, lproc, each = 500, 5, (10 if a.quick else 30)
            interval = 1.0  # a report per trial per second: 500 reports/s offered

            def latency(ctx, handled):
                start, out = ctx.Event(), ctx.Queue()
                per = n_trials // lproc
                procs = [ctx.Process(target=latency_process, args=(url, range(i * per, (i + 1) * per), each,
                                                                   interval, start, out)) for i in range(lproc)]
                for p in procs:
                    p.start()
                time.sleep(2.0)
                start.set()
                lat = []
                for _ in procs:
                    lat.extend(out.get(timeout=300))
                for p in procs:
                    p.join()
                return np.array(lat)

            lat = with_loop(url, n_trials, latency)
            RedisBus(url=url).delete_experiment(EXP)
            cost = client_cost(url, 20_000 if a.quick else 100_000)
            alone = loop_alone(url, 32_000 if a.quick else 128_000)
        finally:
            server.stop()

    ok = np.isfinite(lat)
    rate = decided / elapsed
    p99 = float(np.sort(lat)[int(math.ceil(0.99 * len(lat))) - 1])
    lines = [
        f"\n### Metric bus ({'quick' if a.quick else 'full'} run; redis-server {server_version()}, 2 cores)\n",
        "| measure | value | target |", "|---|---|---|",
        f"| redis-benchmark XADD (report-sized entry), 50 clients, no pipelining | {xadd:,.0f} /s | - |",
        f"| ingest: reports decided by the scheduler loop ({n_proc} processes x {per_proc} trials, batched client) "
        f"| {rate:,.0f} /s ({decided:,} of {sent:,} in {elapsed:.1f} s) | >= {xadd / 2:,.0f} /s (half of XADD) "
        f"{'met' if rate >= xadd / 2 else 'MISSED'} |",
        f"| scheduler loop alone, draining a filled stream (ASHA Study, 64 trials) | {alone:,.0f} /s | "
        f">= {xadd / 2:,.0f} /s {'met' if alone >= xadd / 2 else 'MISSED'} |",
        f"| report-to-decision p50, 500 trials, 1 report / {interval:g} s each, waiting | "
        f"{np.median(lat[ok]) * 1e3:.2f} ms | - |",
        f"| report-to-decision p99 | {p99 * 1e3:.2f} ms | < 20 ms {'met' if p99 < 0.020 else 'MISSED'} |",
        f"| reports without an answer within 2 s | {int((~ok).sum())} of {len(lat)} | 0 |",
    ]
    for name, us in cost.items():
        lines.append(f"| TrialClient.send_report cost per call, {name} | {us:.1f} us | - |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def server_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "?"


if __name__ == "__main__":
    main()
