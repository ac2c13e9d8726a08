"""The metric bus end to end: trial processes -> Redis Streams -> scheduler loop -> decisions.

    python bench/bus.py            # full
    python bench/bus.py --quick

Starts its own redis-server on a free loopback port (no append-only file, as
redis-benchmark runs against it) and measures, in the same run:
  1. redis-benchmark XADD (report-sized entry), 50 clients, no pipelining: the server's own rate here;
  2. ingest: 64 trial processes report as fast as they can through TrialClient (batched), one
     scheduler-loop process feeds an ASHA Study and writes decisions; rate = reports decided per
     second, from the start until the last report sent has its decision;
  3. latency: 500 concurrent trial processes, each reporting once per `interval` and waiting for
     its decision (wait=True); report-to-decision time p50/p99;
  4. what TrialClient.send_report costs the training loop per call.
Every trial is its own process (forked, so 500 start in seconds): threads in a few processes
would measure their own GIL contention rather than the bus.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
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
    bus = RedisBus(url=url, maxlen=10**7)
    loop = SchedulerLoop(bus, EXP, StudyHandler(study, "acc"), count=1024)
    ready.set()
    while not stop.is_set():
        loop.run_once(block_s=0.05)
        handled.value = loop.handled


# -- trial processes --------------------------------------------------------------------


def flood_trial(bus, n, seconds):
    """One trial reporting as fast as it can (batched client); returns how many reports."""
    c = TrialClient(bus, EXP, n, batch=64, flush_s=0.02)
    k = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        k += 1
        c.send_report(k, {"acc": (n % 97) / 100 + k * 1e-9})
    c.close()
    return k


def paced_trial(bus, n, seconds, rate):
    """One trial reporting `rate` times a second for `seconds` (batched client; a burst every 50 ms,
    catching up if it fell behind); returns how many reports it sent."""
    c = TrialClient(bus, EXP, n, batch=64, flush_s=0.02)
    k = 0
    t0 = time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate)
        while k < due:
            k += 1
            c.send_report(k, {"acc": (n % 97) / 100 + k * 1e-9})
        time.sleep(0.05)
    c.close()
    return k


def latency_trial(bus, n, reports_each, interval):
    """One trial reporting once per interval and waiting for each decision; returns the latencies."""
    c = TrialClient(bus, EXP, n, wait=True, wait_s=2.0)
    rng = np.random.default_rng(n)
    # All 500 processes wake at the start signal: let that burst pass (one interval) before the first
    # report, then spread the trials over the interval.
    time.sleep(interval + rng.random() * interval)
    mine = []
    nxt = time.monotonic()
    for k in range(1, reports_each + 1):
        t0 = time.perf_counter()
        c.send_report(k, {"acc": 0.5 + (n % 13) / 100 + k * 1e-6})
        mine.append(time.perf_counter() - t0 if c.decided_seq >= k else float("inf"))  # inf: no answer in 2 s
        nxt += interval
        time.sleep(max(0.0, nxt - time.monotonic()))
    return mine


def trials_process(url, target, args, numbers, start, out):
    """Forks one process per trial number (a trial is a process, as in a pod; threads in one
    process would measure the GIL), starts them together when `start` is set, and puts the list
    of their results on `out`. Forked from this process, which has done the imports once."""
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    gc.collect()
    gc.freeze()  # fewer copy-on-write faults in the children
    pids = []
    for n in numbers:
        pid = os.fork()
        if pid == 0:  # the trial
            code = 1
            try:
                bus = RedisBus(url=url, maxlen=10**7)
                bus.r.ping()  # connected before the clock starts, as a trial is by its first report
                start.wait()
                (tmp / f"{n}.json").write_text(json.dumps(target(bus, n, *args)))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    out.put("forked")
    failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
    results = [json.loads((tmp / f"{n}.json").read_text()) for n in numbers if (tmp / f"{n}.json").exists()]
    shutil.rmtree(tmp, ignore_errors=True)
    out.put((results, failed))


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
    t0, c0 = time.perf_counter(), time.process_time()
    while loop.handled < n // 64 * 64:
        loop.run_once(0.01)
    rate = loop.handled / (time.perf_counter() - t0)
    cpu_us = (time.process_time() - c0) / loop.handled * 1e6
    bus.delete_experiment("alone")
    return rate, cpu_us


def alone_only(n: int, runs: int = 3) -> None:
    """--alone: only the loop-alone measure, a few times (its CPU per report hardly depends on the
    machine's other load, unlike its rate)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), appendonly=False)
        server.start()
        try:
            got = [loop_alone(server.url, n) for _ in range(runs)]
        finally:
            server.stop()
    print(f"scheduler loop alone, draining a filled stream (ASHA Study, 64 trials, {n:,} reports, {runs} runs): "
          f"{max(r for r, _ in got):,.0f} /s at best; CPU per report {min(c for _, c in got):.2f} us at best "
          f"({', '.join(f'{c:.2f}' for _, c in got)})")


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
    ap.add_argument("--alone", action="store_true", help="only the scheduler loop alone (CPU per report)")
    a = ap.parse_args()
    if a.alone:
        return alone_only(32_000 if a.quick else 128_000)
    seconds = 3 if a.quick else 8
    load0 = os.getloadavg()[0]  # the machine may be shared: shown with the results
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), appendonly=False)
        server.start()
        try:
            url = server.url
            xadd = redis_benchmark(server.port, 100_000 if a.quick else 300_000)
            subprocess.run(["redis-cli", "-p", str(server.port), "flushall"], capture_output=True, check=True)

            # 2. ingest: 64 trial processes. Sustained: each reports at a fixed pace, stepping the
            # total up from the target while the loop keeps up. Flat out: each reports as fast as it can.
            n_trials, factors = 64, (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)

            def run_trials(ctx, handled, target, args, numbers):
                start, out = ctx.Event(), ctx.Queue()
                p = ctx.Process(target=trials_process, args=(url, target, args, numbers, start, out))
                p.start()
                assert out.get(timeout=120) == "forked"
                time.sleep(1.0)  # let the trial processes settle before the clock starts
                h0, t0 = handled.value, time.perf_counter()
                start.set()
                counts, failed = out.get(timeout=300)
                sent_by = time.perf_counter()
                p.join()
                if failed:
                    raise RuntimeError(f"{failed} trial processes failed")
                sent = sum(counts)
                deadline = time.monotonic() + 120
                while handled.value - h0 < sent and time.monotonic() < deadline:
                    time.sleep(0.005)
                done = time.perf_counter()
                return dict(sent=sent, decided=handled.value - h0, elapsed=done - t0, sent_rate=sent / (sent_by - t0),
                            lag=done - sent_by)

            def ingest(ctx, handled):
                steps = []
                for i, f in enumerate(factors):
                    st = run_trials(ctx, handled, paced_trial, (seconds, xadd / 2 * f / n_trials),
                                    range(i * n_trials, (i + 1) * n_trials))
                    st.update(offered=xadd / 2 * f, kept_up=st["decided"] == st["sent"] and st["lag"] <= 0.5)
                    steps.append(st)
                    if not st["kept_up"]:
                        break
                n = len(factors)
                return steps, run_trials(ctx, handled, flood_trial, (seconds,), range(n * n_trials, (n + 1) * n_trials))

            steps, flood = with_loop(url, n_trials * (len(factors) + 1), ingest)
            RedisBus(url=url).delete_experiment(EXP)

            # 3. latency with 500 concurrent trial processes
            n_trials, each = 500, (10 if a.quick else 30)
            interval = 1.0  # a report per trial per second: 500 reports/s offered

            def latency(ctx, handled):
                start, out = ctx.Event(), ctx.Queue()
                p = ctx.Process(target=trials_process, args=(url, latency_trial, (each, interval), range(n_trials),
                                                             start, out))
                p.start()
                assert out.get(timeout=120) == "forked"
                time.sleep(1.0)
                start.set()
                lat, failed = out.get(timeout=300)
                p.join()
                if failed:
                    raise RuntimeError(f"{failed} trial processes failed")
                return np.array([x for mine in lat for x in mine])

            lat = with_loop(url, n_trials, latency)
            RedisBus(url=url).delete_experiment(EXP)
            cost = client_cost(url, 20_000 if a.quick else 100_000)
            alone, alone_cpu = loop_alone(url, 32_000 if a.quick else 128_000)
        finally:
            server.stop()

    ok = np.isfinite(lat)
    p99 = float(np.sort(lat)[int(math.ceil(0.99 * len(lat))) - 1])
    limit = xadd / 2
    kept = [st for st in steps if st["kept_up"]]
    best = max(kept, key=lambda st: st["decided"] / st["elapsed"]) if kept else None
    rate = best["decided"] / best["elapsed"] if best else 0.0
    flood_rate = flood["decided"] / flood["elapsed"]
    lines = [
        f"\n### Metric bus ({'quick' if a.quick else 'full'} run; redis-server {server_version()}, {os.cpu_count()} cores, "
        f"1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)\n",
        "| measure | value | target |", "|---|---|---|",
        f"| redis-benchmark XADD (report-sized entry), 50 clients, no pipelining | {xadd:,.0f} /s | - |",
        "| ingest sustained: reports decided by the scheduler loop, 64 paced trial processes (batched client), "
        "highest offered rate it kept up with | "
        + (f"{rate:,.0f} /s ({best['decided']:,} of {best['sent']:,} in {best['elapsed']:.1f} s)" if best else "none")
        + f" | >= {limit:,.0f} /s (half of XADD) {'met' if rate >= limit else 'MISSED'} |",
        f"| ingest flat out: 64 trial processes reporting as fast as they can, until the last is decided | "
        f"{flood_rate:,.0f} /s ({flood['decided']:,} of {flood['sent']:,} in {flood['elapsed']:.1f} s; "
        f"sent at {flood['sent_rate']:,.0f} /s, last decided {flood['lag']:.1f} s after) | - |",
        f"| scheduler loop alone, draining a filled stream (ASHA Study, 64 trials) | {alone:,.0f} /s "
        f"({alone_cpu:.1f} us CPU per report) | - |",
        f"| report-to-decision p50, 500 trial processes, 1 report / {interval:g} s each, waiting | "
        f"{np.median(lat[ok]) * 1e3:.2f} ms | - |",
        f"| report-to-decision p99 | {p99 * 1e3:.2f} ms | < 20 ms {'met' if p99 < 0.020 else 'MISSED'} |",
        f"| reports without an answer within 2 s | {int((~ok).sum())} of {len(lat)} | 0 |",
    ]
    for name, us in cost.items():
        lines.append(f"| TrialClient.send_report cost per call, {name} | {us:.1f} us | - |")
    lines += ["", "Sustained-ingest steps (offered = total pace of the 64 trials; kept up = every report decided "
              "within 0.5 s of the last one sent):", "",
              "| offered | sent | decided | rate | last decided after the last sent | kept up |", "|---|---|---|---|---|---|"]
    for st in steps:
        lines.append(f"| {st['offered']:,.0f} /s | {st['sent_rate']:,.0f} /s | {st['decided']:,} of {st['sent']:,} | "
                     f"{st['decided'] / st['elapsed']:,.0f} /s | {st['lag']:.2f} s | {'yes' if st['kept_up'] else 'no'} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def server_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "?"


if __name__ == "__main__":
    main()
