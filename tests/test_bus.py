"""The metric bus contract, for the in-memory bus and for Redis Streams on a real redis-server."""

from __future__ import annotations

import json
import math
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kubetune import Study
from kubetune.api.trial import Decision, Trial, TrialState
from kubetune.bus import MemoryBus, Report, SchedulerLoop, StudyHandler, TrialClient


EXP = "mnist-asha"


@pytest.fixture(params=["memory", "redis", "redis-resp2"])
def bus(request):
    if request.param == "memory":
        b = MemoryBus(maxlen=100)
        yield b
        return
    import redis as redis_py

    from kubetune.bus.redis_streams import RedisBus

    server = request.getfixturevalue("redis_server")
    if request.param == "redis-resp2":  # the bus reads raw replies: both protocols' shapes
        b = RedisBus(redis_py.Redis.from_url(server.url, protocol=2), maxlen=100)
    else:
        b = RedisBus(url=server.url, maxlen=100)
    b.server = server
    yield b
    b.close()


def reports(trial, n, start=1):
    return [Report(trial, q, float(q), {"acc": q / 10}) for q in range(start, start + n)]


# -- the contract -------------------------------------------------------------


def test_reports_are_delivered_once_in_order(bus):
    bus.publish(EXP, reports(0, 3) + reports(1, 2))
    got = bus.read(EXP, "c0", count=10)
    assert [(m.report.trial, m.report.seq) for m in got] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert got[0].report == Report(0, 1, 1.0, {"acc": 0.1})
    assert bus.read(EXP, "c0") == []
    assert bus.read("other-experiment", "c0") == []


def test_unacknowledged_reports_come_back_to_a_restarted_consumer(bus):
    bus.publish(EXP, reports(0, 4))
    got = bus.read(EXP, "c0", count=10)
    bus.ack(EXP, [got[0].id, got[1].id])
    again = bus.read(EXP, "c0", pending=True)
    assert [m.report.seq for m in again] == [3, 4]
    bus.ack(EXP, [m.id for m in again])
    assert bus.read(EXP, "c0", pending=True) == []


def test_last_id_names_the_newest_report(bus):
    from kubetune.bus.base import position

    assert bus.last_id(EXP) is None
    bus.publish(EXP, reports(0, 3))
    ids = [m.id for m in bus.read(EXP, "c0", count=10)]
    assert bus.last_id(EXP) == ids[-1] and position(ids[0]) < position(ids[-1])


def test_catch_up_returns_once_the_running_loop_handled_every_report_sent_before(bus):
    seen = []
    loop = SchedulerLoop(bus, EXP, lambda m: seen.append(m.report.seq) or Decision(), consumer="c0")
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,), kwargs={"block_s": 0.5})
    runner.start()
    try:
        for n in range(5):
            bus.publish(EXP, reports(0, 20, start=1 + 20 * n))
            loop.catch_up(timeout_s=10)
            assert len(seen) == 20 * (n + 1)
    finally:
        stop.set()
        runner.join()


def test_catch_up_without_a_running_loop_drains_by_itself(bus):
    seen = []
    loop = SchedulerLoop(bus, EXP, lambda m: seen.append(m.report.seq) or Decision(), consumer="c0")
    loop.catch_up(timeout_s=0.1)  # nothing sent yet: returns at once
    bus.publish(EXP, reports(0, 7))
    loop.catch_up(timeout_s=0.1)
    assert seen == list(range(1, 8))


def test_decisions_reach_only_their_trial_in_order(bus):
    bus.decide(EXP, [(0, 1, Decision()), (1, 1, Decision("stop", "bad")), (0, 2, Decision("pause", "rung"))])
    assert bus.take_decisions(EXP, 0) == [(1, Decision()), (2, Decision("pause", "rung"))]
    assert bus.take_decisions(EXP, 1) == [(1, Decision("stop", "bad"))]
    assert bus.take_decisions(EXP, 0) == []
    exploit = Decision("exploit", "bottom", donor=3, params={"lr": 0.1, "opt": "sgd"})
    bus.decide(EXP, [(2, 7, exploit)])
    assert bus.take_decisions(EXP, 2) == [(7, exploit)]


def test_a_decision_is_taken_once_and_skipping_passes_over_only_those_waiting(bus):
    """A take hands each decision out once, whether or not the next take finds the trial's queue
    trimmed yet; skip_decisions (a new run of the trial) passes over what waits, not what comes after."""
    bus.decide(EXP, [(0, 1, Decision("stop", "old run"))])
    bus.decide(EXP, [(0, 2, Decision("pause", "old run"))])
    bus.skip_decisions(EXP, 0)
    assert bus.take_decisions(EXP, 0) == []
    bus.decide(EXP, [(0, 1, Decision())])
    assert bus.publish_and_take(EXP, reports(0, 1), 0) == [(1, Decision())]
    for seq in (2, 3):
        exploit = Decision("exploit", "bottom", donor=1, params={"lr": 0.1 * seq})
        bus.decide(EXP, [(0, seq, exploit)])
        assert bus.publish_and_wait(EXP, reports(0, 1, start=seq), 0, block_s=5) == [(seq, exploit)]
        assert bus.take_decisions(EXP, 0) == [] and bus.publish_and_wait(EXP, [], 0, block_s=0.01) == []
    bus.skip_decisions(EXP, 0)  # nothing waiting: nothing changes
    bus.decide(EXP, [(0, 4, Decision("stop", "done"))])
    assert bus.take_decisions(EXP, 0) == [(4, Decision("stop", "done"))]
    if not isinstance(bus, MemoryBus):  # what was taken is trimmed away with the next round trip
        assert bus.take_decisions(EXP, 0) == [] and bus.r.xlen(bus.decision_key(EXP, 0)) == 0


def test_a_trial_s_decisions_are_bounded(bus):
    """decisions_kept bounds what waits for a trial that does not take (a lost pod)."""
    for seq in range(1, 201):
        bus.decide(EXP, [(0, seq, Decision())])
    got = bus.take_decisions(EXP, 0)
    assert [s for s, _ in got] == list(range(201 - bus.decisions_kept, 201))
    bus.decide(EXP, [(1, seq, Decision()) for seq in range(1, 201)])  # in one write: its latest
    assert [s for s, _ in bus.take_decisions(EXP, 1)] == list(range(201 - bus.decisions_kept, 201))


def answer_when_reported(bus, decision) -> threading.Thread:
    """A scheduler thread: waits for the first reports and answers each with `decision`."""
    def scheduler():
        msgs = []
        while not msgs:
            msgs = bus.read(EXP, "c0", block_s=5)
        bus.decide(EXP, [(m.report.trial, m.report.seq, decision) for m in msgs])

    th = threading.Thread(target=scheduler)
    th.start()
    return th


def test_a_trial_blocks_until_its_decision_arrives(bus):
    th = answer_when_reported(bus, Decision("stop", "late"))
    bus.publish(EXP, reports(5, 1))
    got = bus.take_decisions(EXP, 5, block_s=30)
    th.join()
    assert got == [(1, Decision("stop", "late"))]


def test_publish_and_wait_returns_the_decision_pushed_while_it_waits(bus):
    th = answer_when_reported(bus, Decision("pause", "rung"))
    got = bus.publish_and_wait(EXP, reports(6, 1), 6, block_s=30)
    th.join()
    assert got == [(1, Decision("pause", "rung"))]
    assert bus.publish_and_wait(EXP, [], 6, block_s=0.05) == []  # nothing more: waits, then empty


def test_decide_ack_read_answers_acknowledges_and_takes_the_next_batch(bus):
    bus.publish(EXP, reports(0, 2))
    first = bus.read(EXP, "c0", count=10)
    bus.publish(EXP, reports(1, 3))
    nxt = bus.decide_ack_read(EXP, [(0, 2, Decision("stop", "done"))], [m.id for m in first], "c0", count=10)
    assert [(m.report.trial, m.report.seq) for m in nxt] == [(1, 1), (1, 2), (1, 3)]
    assert bus.take_decisions(EXP, 0) == [(2, Decision("stop", "done"))]
    # The first batch is acknowledged; the one just read is pending until it is answered.
    assert [m.report for m in bus.read(EXP, "c0", pending=True)] == [m.report for m in nxt]
    assert bus.decide_ack_read(EXP, [], [m.id for m in nxt], "c0", block_s=0.05) == []
    assert bus.read(EXP, "c0", pending=True) == []


def test_a_batch_with_an_odd_entry_is_decoded_entry_by_entry(redis_server):
    from kubetune.bus.redis_streams import RedisBus

    bus = RedisBus(url=redis_server.url)
    key = bus.stream_key(EXP)
    bus.publish(EXP, reports(0, 2))
    bus.r.xadd(key, {"r": '[1,1,1.0,{"acc":0.5}]', "note": "x"})  # another field: not the usual layout
    bus.r.xadd(key, {"r": '[2,1,1,{"acc":0.5}],[2,2,2,{"acc":0.6}]'})  # two values in one payload
    bus.publish(EXP, reports(3, 2))
    got = bus.read(EXP, "c0", count=10)
    assert [(m.report.trial, m.report.seq) for m in got] == [(0, 1), (0, 2), (1, 1), (2, 1), (3, 1), (3, 2)]
    assert got[3].report == Report(2, 1, 1.0, {"acc": 0.5}) and isinstance(got[3].report.step, float)
    assert [m.report for m in got[4:]] == reports(3, 2)
    bus.close()


def test_entries_that_are_not_reports_are_acknowledged_and_skipped(redis_server):
    """A stray or corrupt stream entry must not wedge the experiment: left pending, it would come back
    at every recovery read and fail the loop each time."""
    from kubetune.bus.redis_streams import GROUP, RedisBus

    bus = RedisBus(url=redis_server.url)
    key = bus.stream_key(EXP)
    bus.publish(EXP, reports(0, 2))
    bus.r.xadd(key, {"r": "not json"})
    bus.r.xadd(key, {"r": '["one",1,1,{"acc":0.5}]'})  # parses, but the trial is not a number
    bus.r.xadd(key, {"r": '[1,1,1,{"acc":"high"}]'})  # a metric that is not a number
    bus.r.xadd(key, {"other": "field"})
    bus.publish(EXP, reports(3, 2))
    got = bus.read(EXP, "c0", count=10)
    assert [(m.report.trial, m.report.seq) for m in got] == [(0, 1), (0, 2), (3, 1), (3, 2)]
    bus.ack(EXP, [m.id for m in got])
    assert bus.r.xpending(key, GROUP)["pending"] == 0
    bus.close()


def test_pending_entries_trimmed_away_are_acknowledged_so_recovery_reaches_the_rest(redis_server):
    """A recovery read starts at the oldest pending entry: trimmed entries (empty when read back)
    left pending would come back first every time and hide the pending reports behind them."""
    from kubetune.bus.redis_streams import GROUP, RedisBus

    bus = RedisBus(url=redis_server.url)
    key = bus.stream_key(EXP)
    bus.publish(EXP, reports(0, 6))
    taken = bus.read(EXP, "c0", count=6)  # read, never acknowledged: the consumer died
    bus.r.xdel(key, *[m.id for m in taken[:4]])  # as MAXLEN trimming does to the oldest
    got = bus.read(EXP, "c0", count=4, pending=True)  # four trimmed ones first: skipped, read on
    assert [(m.report.trial, m.report.seq) for m in got] == [(0, 5), (0, 6)]
    assert bus.r.xpending(key, GROUP)["pending"] == 2  # the trimmed ones were acknowledged
    assert bus.read(EXP, "c0", count=4, pending=True) != []  # the two reports wait for their handler
    bus.close()


def test_a_report_the_handler_fails_on_is_answered_continue_and_the_loop_goes_on(bus):
    def handler(m):
        if m.report.trial == 0 and m.report.seq == 2:
            raise ValueError("no such metric")
        return Decision("stop", "done") if m.report.trial == 1 else Decision()

    loop = SchedulerLoop(bus, EXP, handler, consumer="c0")
    bus.publish(EXP, reports(0, 2) + reports(1, 1))
    assert loop.drain() == 3
    got = dict(bus.take_decisions(EXP, 0))
    assert got[2].action == "continue" and "no such metric" in got[2].reason
    assert dict(bus.take_decisions(EXP, 1))[1] == Decision("stop", "done")  # the rest of the batch was decided
    assert loop.drain() == 0  # nothing left pending or unread


def test_packed_commands_are_those_of_the_plain_packer():
    from kubetune.bus.base import encode_decision
    from kubetune.bus.redis_streams import GROUP, RedisBus, _pack

    bus = RedisBus(url="redis://127.0.0.1:1/0")  # never connects
    ids = ["1700000000000-0", "1700000000000-17", "1700000000001-3"]
    assert bus._xack(EXP, ids) == _pack("XACK", bus.stream_key(EXP), GROUP, *ids)
    decisions = [(1, 2, Decision()), (3, 4, Decision("stop", "pruné")), (1, 5, Decision("pause", "rung 0"))]
    expected = []
    for trial, seqs in ((1, (0, 2)), (3, (1,))):
        key = bus.decision_key(EXP, trial)
        batch = "[%s]" % ",".join(encode_decision(*decisions[i][1:]) for i in seqs)
        expected += [_pack("XADD", key, "MAXLEN", bus.decisions_kept, "*", "d", batch),
                     _pack("EXPIRE", key, bus.decision_ttl_s)]
    assert bus._decisions(EXP, decisions) == expected
    assert bus._decisions(EXP, decisions) == expected  # from the per-trial cache
    assert bus._xread(EXP, 1, b"1700000000000-17") == _pack("XREAD", "COUNT", bus.decisions_kept, "STREAMS",
                                                             bus.decision_key(EXP, 1), "1700000000000-17")


def test_the_stream_is_bounded(bus):
    for i in range(10):
        bus.publish(EXP, reports(0, 100, start=1 + 100 * i))
    kept = bus.backlog(EXP)
    # Redis trims whole blocks (MAXLEN ~), so a little over the bound is kept.
    assert 100 <= len(kept) <= 300
    assert kept[-1].report.seq == 1000


def test_a_stream_left_behind_expires_a_week_after_its_last_report(redis_server):
    """Pods of a deleted experiment may report after its keys went: what they write must not stay for good."""
    from kubetune.bus.redis_streams import RedisBus

    bus = RedisBus(url=redis_server.url)
    try:
        bus.publish(EXP, reports(0, 2))
        assert 7 * 24 * 3600 - 60 < bus.r.ttl(bus.stream_key(EXP)) <= 7 * 24 * 3600
        bus.r.expire(bus.stream_key(EXP), 5)
        TrialClient(bus, EXP, 0, batch=1).send_report(3, {"acc": 0.3})  # each report renews it
        assert bus.r.ttl(bus.stream_key(EXP)) > 60
    finally:
        bus.close()


def test_delete_experiment_removes_every_key(bus):
    bus.publish(EXP, reports(0, 3))
    bus.read(EXP, "c0")
    bus.decide(EXP, [(0, 1, Decision()), (4, 1, Decision())])
    bus.publish("keep-me", reports(0, 1))
    bus.delete_experiment(EXP)
    if isinstance(bus, MemoryBus):
        assert bus.experiments() == {"keep-me"}
    else:
        assert bus.keys(EXP) == []
        assert bus.keys("keep-me") != []
    assert bus.backlog(EXP) == [] and bus.take_decisions(EXP, 0) == []
    # The experiment can start again from nothing.
    bus.publish(EXP, reports(0, 1))
    assert [m.report.seq for m in bus.read(EXP, "c0")] == [1]


def test_client_batches_reports_and_keeps_a_stop(bus):
    client = TrialClient(bus, EXP, 3, batch=8, flush_s=3600)
    for step in range(1, 21):
        assert client.send_report(step, {"acc": step / 20}).action == "continue"
    assert len(bus.read(EXP, "c0", count=100)) == 16  # two full batches sent
    client.flush()
    got = bus.read(EXP, "c0", count=100)
    assert [m.report.seq for m in got] == [17, 18, 19, 20]
    bus.decide(EXP, [(3, 20, Decision("stop", "pruned")), (3, 21, Decision())])
    assert client.flush().stop
    assert client.send_report(21, {"acc": 1}).stop  # a stop sticks


def test_client_hands_out_an_exploit_once(bus):
    """An exploit is acted on once: later reports that no newer decision answered yet go on as
    `continue` (batched or timed out), and a copy of the same decision sent again is not taken twice."""
    exploit = Decision("exploit", "bottom", donor=1, params={"lr": 0.1}, donor_step=4)
    client = TrialClient(bus, EXP, 5, batch=1)
    assert client.send_report(4, {"acc": 0.5}).action == "continue"
    bus.decide(EXP, [(5, 1, exploit)])
    assert client.send_report(5, {"acc": 0.5}) == exploit
    assert [client.send_report(s, {"acc": 0.6}).action for s in (6, 7, 8)] == ["continue"] * 3
    bus.decide(EXP, [(5, 1, exploit)])  # the same decision again (a report sent again, answered again)
    assert client.send_report(9, {"acc": 0.6}).action == "continue"
    # An exploit and a later report's `continue` taken in one batch: the exploit is not lost.
    later = Decision("exploit", "bottom", donor=2, params={"lr": 0.2}, donor_step=9)
    bus.decide(EXP, [(5, 9, later), (5, 10, Decision())])
    assert client.send_report(11, {"acc": 0.6}) == later
    # Waiting for its own decision, which does not come in time: not the earlier exploit either.
    waiting = TrialClient(bus, EXP, 6, wait=True, wait_s=0.05)
    bus.decide(EXP, [(6, 1, exploit)])
    assert waiting.send_report(4, {"acc": 0.5}) == exploit
    assert waiting.send_report(5, {"acc": 0.5}).action == "continue"


def test_client_waits_through_a_held_decision_and_never_returns_wait(bus):
    """Synchronous PBT: `wait` keeps the report waiting for the real decision on it."""
    exploit = Decision("exploit", "bottom", donor=1, params={"lr": 0.1})

    def scheduler():
        msgs = []
        while not msgs:
            msgs = bus.read(EXP, "c0", block_s=5)
        bus.decide(EXP, [(2, msgs[0].report.seq, Decision("wait", "held"))])
        threading.Event().wait(0.3)  # longer than the client's wait_s: only the hold keeps it waiting
        bus.decide(EXP, [(2, msgs[0].report.seq, exploit)])

    th = threading.Thread(target=scheduler)
    th.start()
    client = TrialClient(bus, EXP, 2, wait=True, wait_s=0.1)
    assert client.send_report(4, {"acc": 0.5}) == exploit
    th.join()
    # A hold that runs out goes on as `continue`; the held report is sent again meanwhile, so that
    # a restarted scheduler (which holds nothing) can answer it.
    client = TrialClient(bus, EXP, 3, wait=True, wait_s=1.0, hold_s=0.5, repeat_s=0.2)
    bus.read(EXP, "c0", count=100)
    bus.decide(EXP, [(3, 1, Decision("wait", "held"))])
    assert client.send_report(4, {"acc": 0.5}).action == "continue"
    again = bus.read(EXP, "c0", count=100)
    assert len(again) >= 2 and all(m.report == Report(3, 1, 4.0, {"acc": 0.5}) for m in again)
    # Batched reports do not wait; a `wait` among their answers reads as `continue`.
    batched = TrialClient(bus, EXP, 4, batch=1)
    bus.decide(EXP, [(4, 1, Decision("wait", "held"))])
    assert batched.send_report(1, {"acc": 0.1}).action == "continue"


# -- the scheduler loop -----------------------------------------------------------


def test_the_loop_pauses_the_garbage_collector_only_while_it_handles_a_batch(bus):
    import gc

    seen = []
    loop = SchedulerLoop(bus, EXP, lambda m: seen.append(gc.isenabled()) or Decision(), consumer="c0", count=4)
    bus.publish(EXP, reports(0, 6))
    assert loop.drain() == 6 and seen == [False] * 6
    assert gc.isenabled()
    gc.disable()  # the application's choice is left alone
    try:
        bus.publish(EXP, reports(0, 2, start=7))
        assert loop.drain() == 2 and not gc.isenabled()
    finally:
        gc.enable()


PARAMS = [{"name": "lr", "type": "double", "min": 1e-3, "max": 1.0, "log": True},
          {"name": "units", "type": "int", "min": 1, "max": 8}]
ASHA = {"name": "asha", "settings": {"resource": "epoch", "min": 1, "max": 9, "reductionFactor": 3}}


def acc(params, epoch):
    return (1 - math.exp(-epoch * params["lr"] * 2)) * (0.5 + params["units"] / 16)


class Experiment:
    """A Study, its state store (a JSON file) and a scheduler loop over a bus; trials run in threads."""

    def __init__(self, bus, path, n_trials=24, workers=4, wait_s=10.0):
        self.bus, self.path, self.n_trials, self.workers = bus, path, n_trials, workers
        self.wait_s = wait_s
        self.lock = threading.RLock()
        self.study = Study(parameters=PARAMS, goal="maximize", seed=7, early_stopping=ASHA)
        self.stop = threading.Event()
        self.loop_thread = None
        self.errors = []
        self.failed = threading.Event()
        self.start_loop()

    def on_error(self, e):
        self.errors.append(e)
        self.failed.set()

    def persist(self):
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps([t.to_dict() for t in self.study.trials]))
            tmp.replace(self.path)

    def stored(self) -> list[Trial]:
        return [Trial.from_dict(d) for d in json.loads(self.path.read_text())] if self.path.exists() else []

    def start_loop(self, crash_after=None):
        handler, persist = StudyHandler(self.study, "acc", self.lock), self.persist
        if crash_after is not None:
            handler, persist = self.dying(handler, crash_after)
        self.loop = SchedulerLoop(self.bus, EXP, handler, persist=persist)
        self.stop = threading.Event()
        self.loop_thread = threading.Thread(target=self.loop.run, args=(self.stop, 0.2, self.on_error),
                                            daemon=True)
        self.loop_thread.start()

    def dying(self, inner, crash_after):
        """A handler that counts reports, and a persist that dies once more than crash_after were
        handled: after handling a batch, before saving or answering it."""
        seen = [0]

        def handler(msg):
            seen[0] += 1
            return inner(msg)

        def persist():
            if seen[0] > crash_after:
                raise RuntimeError("scheduler loop killed")
            self.persist()

        return handler, persist

    def stop_loop(self):
        self.stop.set()
        self.loop_thread.join(30)
        assert not self.loop_thread.is_alive()

    def restart_loop_from_store(self):
        """A new process: the Study rebuilt from the state store, a fresh loop."""
        self.stop_loop()
        with self.lock:
            self.study = Study(parameters=PARAMS, goal="maximize", seed=7, early_stopping=ASHA,
                               trials=self.stored())
        self.start_loop()

    def run_trial(self, number, progress):
        client = TrialClient(self.bus, EXP, number, wait=True, wait_s=self.wait_s)
        with self.lock:
            params = dict(self.study.trials[number].params)
        value = None
        for epoch in range(1, 10):
            value = acc(params, epoch)
            d = client.send_report(epoch, {"acc": value, "loss": 1 - value})
            progress()
            if d.stop:
                break
        client.close()
        # The engine records the finished trial in the state store, in one step: a loop restarted
        # between the tell and the write would rebuild its Study from a store without it.
        with self.lock:
            trial = self.study.trials[number]
            self.study.tell(trial, value)
            self.persist()

    def run(self, progress=lambda: None):
        with ThreadPoolExecutor(self.workers) as pool:
            futures = []
            for _ in range(self.n_trials):
                with self.lock:
                    number = self.study.ask().number
                    # Recorded before it runs, as the engine journals a trial and the operator creates its
                    # resource: a loop restarted from the store must know every trial that may report.
                    self.persist()
                futures.append(pool.submit(self.run_trial, number, progress))
            for f in futures:
                f.result(timeout=120)
        self.stop_loop()


def test_loop_runs_an_asha_experiment_over_the_bus(bus, tmp_path):
    exp = Experiment(bus, tmp_path / "trials.json")
    exp.run()
    states = {t.state for t in exp.study.trials}
    assert states <= {TrialState.SUCCEEDED, TrialState.PRUNED} and TrialState.PRUNED in states
    # The loop answered every report: pruned trials stopped at a rung, not at the end.
    assert all(t.intermediate[-1][0] in (1, 3) for t in exp.study.trials if t.state == TrialState.PRUNED)
    assert [t.to_dict() for t in exp.stored()] == [t.to_dict() for t in exp.study.trials]


def test_killed_scheduler_loop_is_rebuilt_from_the_trial_list(bus, tmp_path):
    exp = Experiment(bus, tmp_path / "trials.json")
    exp.stop_loop()
    exp.start_loop(crash_after=30)

    def watch():  # the operator notices the dead loop and starts a new one
        assert exp.failed.wait(60)
        exp.restart_loop_from_store()

    watcher = threading.Thread(target=watch)
    watcher.start()
    exp.run()
    watcher.join(60)
    assert any("killed" in str(e) for e in exp.errors)
    trials = exp.stored()
    assert len(trials) == exp.n_trials and all(t.state.finished for t in trials)
    for t in trials:  # reports applied once, even those re-read after the crash
        steps = [s for s, _ in t.intermediate]
        assert steps == sorted(set(steps))


@pytest.mark.parametrize("keep_data", [True, False], ids=["aof-kept", "redis-data-lost"])
def test_experiment_completes_across_a_redis_kill(redis_server, tmp_path, keep_data):
    from kubetune.bus.redis_streams import RedisBus

    bus = RedisBus(url=redis_server.url)
    # A report lost with Redis's data gets no answer: its trial waits wait_s, then trains on.
    exp = Experiment(bus, tmp_path / "trials.json", n_trials=30, wait_s=1.0)
    finished_before = {}
    killed = threading.Event()
    count = [0]
    lock = threading.Lock()

    def progress():
        with lock:
            count[0] += 1
            if count[0] != 25:  # every trial reports at least once: always reached
                return
        # Mid-experiment: note what is finished, kill Redis, start it again.
        finished_before.update({t.number: t.to_dict() for t in exp.stored() if t.value is not None})
        redis_server.restart(keep_data=keep_data)
        killed.set()

    exp.run(progress)
    assert killed.is_set()
    trials = exp.stored()
    assert len(trials) == exp.n_trials and all(t.state.finished for t in trials)
    # No finished result was lost or changed.
    for number, before in finished_before.items():
        assert trials[number].to_dict() == before
    bus.delete_experiment(EXP)
    assert bus.keys(EXP) == []
    bus.close()


def test_password_is_required_and_used(redis_server_factory):
    import redis as redis_py

    from kubetune.bus.redis_streams import RedisBus

    server = redis_server_factory(password="s3cret")
    with pytest.raises(redis_py.AuthenticationError):
        RedisBus(url=server.url).backlog(EXP)
    bus = RedisBus(url=server.url, password="s3cret")
    bus.publish(EXP, reports(0, 2))
    assert len(bus.read(EXP, "c0")) == 2
    bus.close()


def pbt_population(bus, settings, seed, block_s, size=6):
    """A PBT Study with `size` started trials, and its scheduler loop over the bus in a thread."""
    lock = threading.RLock()
    study = Study(parameters=PARAMS, goal="maximize", seed=seed, early_stopping={"name": "pbt", "settings": settings})
    handler = StudyHandler(study, "acc", lock)
    loop = SchedulerLoop(bus, EXP, handler, released=handler.released)
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop, block_s), daemon=True)
    runner.start()
    with lock:
        pop = [study.ask() for _ in range(size)]
        for t in pop:
            t.state = TrialState.RUNNING  # started, as the engine and operator record it
    return study, lock, loop, stop, runner, pop


def run_members(member, pop, stop, runner):
    """Runs member(number) for each trial of the population in threads, then stops the scheduler loop."""
    try:
        with ThreadPoolExecutor(len(pop)) as pool:
            for f in [pool.submit(member, t.number) for t in pop]:
                f.result(timeout=60)
    finally:
        stop.set()
        runner.join()


def test_loop_runs_a_synchronous_pbt_population_over_the_bus(bus):
    """Members start at different times; each check waits for the whole population, so every
    exploit takes a donor at the exploiting trial's own step, and no trial ever sees `wait`."""
    import time

    settings = {"perturbationInterval": 3, "quantileFraction": 0.25, "synch": True}
    study, lock, loop, stop, runner, pop = pbt_population(bus, settings, seed=3, block_s=0.05)
    seen = []

    def member(number):
        time.sleep(0.05 * number)  # processes start apart
        client = TrialClient(bus, EXP, number, wait=True, wait_s=10)
        with lock:
            params = dict(study.trials[number].params)
        epoch, value = 0, 0.0
        while epoch < 12:
            epoch += 1
            value = acc(params, epoch)
            d = client.send_report(epoch, {"acc": value})
            seen.append(d.action)
            if d.action == "exploit":
                params = d.params
        client.close()
        with lock:
            study.tell(study.trials[number], value)

    run_members(member, pop, stop, runner)
    assert "wait" not in seen and "exploit" in seen
    exploits = [e for t in study.trials for e in t.events if e["event"] == "exploit"]
    assert exploits and all(e["donor_step"] == e["step"] for e in exploits)
    assert all(t.state == TrialState.SUCCEEDED for t in study.trials)


def test_synchronous_pbt_survives_a_scheduler_killed_while_members_wait(bus, tmp_path):
    """The loop dies while members wait on held decisions. A new one, rebuilt from the state store,
    judges the reports they send again: no member is waved on without its generation's decision, and
    what every trainer applied is what the store records (parameters and exploits)."""
    import time

    es = {"name": "pbt", "settings": {"perturbationInterval": 3, "quantileFraction": 0.25, "synch": True}}
    path = tmp_path / "trials.json"
    lock = threading.RLock()
    state = {"study": Study(parameters=PARAMS, goal="maximize", seed=3, early_stopping=es)}
    with lock:
        pop = [state["study"].ask() for _ in range(6)]
        for t in pop:
            t.state = TrialState.RUNNING

    def persist():
        with lock:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([t.to_dict() for t in state["study"].trials]))
            tmp.replace(path)

    def stored():
        return [Trial.from_dict(d) for d in json.loads(path.read_text())]

    persist()
    killed, errors = threading.Event(), []
    held_saved = [0]  # persists that saved a trial answered `wait`

    def start(dying):
        handler = StudyHandler(state["study"], "acc", lock)

        def save():
            if dying and held_saved[0] >= 2 and not killed.is_set():
                killed.set()  # dies after handling a batch, before saving or answering it
                raise RuntimeError("scheduler loop killed")
            persist()
            if handler.waiting:
                held_saved[0] += 1

        loop = SchedulerLoop(bus, EXP, handler, persist=save, released=handler.released)
        stop = threading.Event()
        runner = threading.Thread(target=loop.run, args=(stop, 0.05, errors.append), daemon=True)
        runner.start()
        return stop, runner

    stop, runner = start(dying=True)

    def restart():
        nonlocal stop, runner
        assert killed.wait(60)
        stop.set()
        runner.join(30)
        with lock:  # a new process: the Study from the state store
            state["study"] = Study(parameters=PARAMS, goal="maximize", seed=3, early_stopping=es, trials=stored())
        stop, runner = start(dying=False)

    applied = {}  # trial -> (parameters the trainer used last, exploits it applied)

    def member(number):
        time.sleep(0.05 * number)
        client = TrialClient(bus, EXP, number, wait=True, wait_s=10, repeat_s=0.3)
        with lock:
            params = dict(state["study"].trials[number].params)
        exploits, epoch, value = [], 0, 0.0
        while epoch < 12:
            epoch += 1
            value = acc(params, epoch)
            d = client.send_report(epoch, {"acc": value})
            assert d.action != "wait"
            if d.action == "exploit":
                params = d.params
                exploits.append((epoch, d.donor))
        client.close()
        applied[number] = (params, exploits)
        with lock:
            state["study"].tell(state["study"].trials[number], value)
            persist()

    watcher = threading.Thread(target=restart)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(pop)) as pool:
            for f in [pool.submit(member, t.number) for t in pop]:
                f.result(timeout=90)
    finally:
        watcher.join(60)
        stop.set()
        runner.join()
    assert killed.is_set() and any("killed" in str(e) for e in errors)
    trials = stored()
    assert all(t.state == TrialState.SUCCEEDED for t in trials)
    recorded = {t.number: [(e["step"], e["donor"]) for t in [t] for e in t.events if e["event"] == "exploit"]
                for t in trials}
    for t in trials:
        params, exploits = applied[t.number]
        assert t.params == params, f"trial {t.number}: the store's parameters are not what it trained with"
        assert recorded[t.number] == exploits
    exploits = [e for t in trials for e in t.events if e["event"] == "exploit"]
    # Every generation (steps 3, 6, 9, 12) still has its bottom quarter (2 of 6) exploit, each at the
    # members' common step.
    steps = sorted(e["step"] for e in exploits)
    assert steps == [3, 3, 6, 6, 9, 9, 12, 12] and all(e["donor_step"] == e["step"] for e in exploits)


def test_batched_reports_apply_each_asynchronous_pbt_exploit_exactly_once(bus):
    """Fast trainers report every step in batches; each exploit the scheduler records is acted on once
    by its trainer, no other, and the parameters a trainer ends with are the ones the store has."""
    import time

    settings = {"perturbationInterval": 4, "quantileFraction": 0.25}
    study, lock, loop, stop, runner, pop = pbt_population(bus, settings, seed=5, block_s=0.01)
    applied = {}

    def member(number):
        client = TrialClient(bus, EXP, number, batch=4, flush_s=0.005)
        with lock:
            params = dict(study.trials[number].params)
        taken = []

        def act(d):
            nonlocal params
            if d.action == "exploit":
                params = d.params
                taken.append(d.donor)

        for epoch in range(1, 41):
            time.sleep(0.002)
            act(client.send_report(epoch, {"acc": acc(params, epoch)}))
        act(client.flush())  # the last reports sent ...
        loop.catch_up()
        act(client.flush())  # ... and their answers taken: an exploit on the last one too
        client.close()
        applied[number] = (params, taken)

    run_members(member, pop, stop, runner)
    recorded = {t.number: [e["donor"] for e in t.events if e["event"] == "exploit"] for t in study.trials}
    assert sum(map(len, recorded.values())) >= 4
    for t in study.trials:
        params, taken = applied[t.number]
        assert taken == recorded[t.number], f"trial {t.number} acted on {taken}, the store has {recorded[t.number]}"
        assert params == t.params


def handled_with_a_failed_save(bus, sent):
    """Runs the loop over the reports `sent` (trial 0) with a first save that fails after the batch was
    handled, before it is acknowledged: the loop reads the batch again. Returns the trial."""
    study = Study(parameters=PARAMS, goal="maximize", seed=7)
    trial = study.ask()
    trial.state = TrialState.RUNNING
    failures = []

    def persist():
        if not failures:
            failures.append(1)
            raise RuntimeError("state store unavailable")

    loop = SchedulerLoop(bus, EXP, StudyHandler(study, "acc"), consumer="c0", persist=persist)
    bus.publish(EXP, sent)
    stop, errors = threading.Event(), []
    runner = threading.Thread(target=loop.run, args=(stop, 0.05, errors.append))
    runner.start()
    try:
        with loop._progress:  # until the batch, read again after the failure, is acknowledged
            assert loop._progress.wait_for(lambda: loop.handled == len(sent), 30)
    finally:
        stop.set()
        runner.join()
    assert [str(e) for e in errors] == ["state store unavailable"]
    assert bus.read(EXP, "c0", pending=True) == []
    return trial


def test_a_batch_handled_but_not_acknowledged_is_applied_once_when_read_again(bus):
    """Every report of a batch read again is recognised as applied, not only each trial's last few:
    batched trials send dozens of steps per flush."""
    trial = handled_with_a_failed_save(bus, [Report(0, q, float(q), {"acc": q / 100}) for q in range(1, 21)])
    assert [s for s, _ in trial.intermediate] == [float(q) for q in range(1, 21)]


def test_reports_that_name_their_epoch_but_no_step_are_applied_once_when_read_again(bus):
    """report(epoch=3, acc=...) without step=: the epoch is the step (as in a local run), so a batch
    read again is recognised; counting reports instead would append each one a second time."""
    trial = handled_with_a_failed_save(bus, [Report(0, q, None, {"acc": q / 100, "epoch": q}) for q in range(1, 11)])
    assert [s for s, _ in trial.intermediate] == [float(q) for q in range(1, 11)]
    assert trial.metrics["epoch"] == 10


def test_a_diverged_report_read_again_is_applied_once(bus):
    """A NaN loss is common (training diverged); the report carrying it may be read again like any."""
    sent = [Report(0, 1, 1.0, {"acc": 0.1}), Report(0, 2, 2.0, {"acc": math.nan}), Report(0, 3, 3.0, {"acc": math.nan})]
    trial = handled_with_a_failed_save(bus, sent)
    assert [s for s, _ in trial.intermediate] == [1.0, 2.0, 3.0]


def test_a_resumed_trial_does_not_take_the_answers_left_for_its_previous_run(bus):
    """Paused at a rung, a trial exits before the answers to its last reports arrive (batched reports are
    answered a few reports later). Resumed later under the same number, the new run must not take
    them: they answer reports of a run that is gone, and a new run numbers its reports from 1 again."""
    pause = Decision("pause", "paused")
    first = TrialClient(bus, EXP, 0, batch=4, flush_s=3600)
    for step in range(1, 6):
        first.send_report(step, {"acc": step / 10})  # 1-4 sent, 5 buffered
    bus.decide(EXP, [(0, 2, pause), (0, 3, pause), (0, 4, pause)])
    assert first.flush().pause  # sends report 5 and takes the pause: the trainer checkpoints and exits
    first.close()
    assert [m.report.seq for m in bus.read(EXP, "c0", count=10)] == [1, 2, 3, 4, 5]
    bus.decide(EXP, [(0, 5, pause)])  # the answer to report 5, after the process exited
    resumed = TrialClient(bus, EXP, 0, batch=4, flush_s=3600)  # a new process, from the checkpoint
    assert [resumed.send_report(step, {"acc": step / 10}).action for step in range(6, 14)] == ["continue"] * 8


def test_a_step_counted_with_numpy_is_sent_like_any_number(bus):
    """Training loops often count with numpy (np.arange) or a framework's integers: the step is a
    number like the metrics. One the bus cannot encode stayed buffered and failed every later send."""
    import numpy as np

    client = TrialClient(bus, EXP, 0, batch=1)
    for step in np.arange(1, 4):
        client.send_report(step, {"acc": np.float32(step / 10)})
    got = bus.read(EXP, "c0", count=10)
    assert [m.report.step for m in got] == [1.0, 2.0, 3.0] and client.errors == 0
    assert all(type(m.report.step) is float for m in got)


class CuttingProxy:
    """A TCP proxy to a redis-server that closes the connection instead of passing on the first reply
    holding each of `markers`: the server ran the command, the client never sees its answer."""

    def __init__(self, port: int, markers: list[bytes]):
        self.target, self.markers, self.cuts = port, list(markers), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src, dst, replies):
        try:
            while data := src.recv(65536):
                cut = [m for m in self.markers if replies and m in data]
                if cut:
                    self.markers.remove(cut[0])
                    self.cuts.append(cut[0])
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_a_report_whose_read_reply_was_lost_is_still_handled(redis_server):
    """The connection drops after Redis delivered a batch to the loop's consumer, before the reply
    arrived: redis-py sends the read again, and a second XREADGROUP > finds nothing new. The batch,
    pending under the consumer, must still reach the handler, not wait for a restart that never comes."""
    from kubetune.bus.redis_streams import RedisBus

    proxy = CuttingProxy(redis_server.port, [b"cut-read", b"cut-next"])
    trials_side = RedisBus(url=redis_server.url)
    bus = RedisBus(url=proxy.url)
    seen = []
    loop = SchedulerLoop(bus, EXP, lambda m: seen.append(m.report.seq) or Decision(), consumer="c0", count=1)
    try:
        assert loop.drain() == 0  # the group exists, nothing pending
        trials_side.publish(EXP, [Report(0, 1, 1.0, {"cut-read": 0.5})])
        assert loop.drain() == 1 and proxy.cuts == [b"cut-read"] and seen == [1]
        # The next batch, read with the answer to the one before: that reply lost.
        trials_side.publish(EXP, [Report(0, 2, 2.0, {"acc": 0.5}), Report(0, 3, 3.0, {"cut-next": 0.5})])
        assert loop.drain() == 2 and proxy.cuts == [b"cut-read", b"cut-next"] and seen == [1, 2, 3]
        assert trials_side.read(EXP, "c0", pending=True) == []
    finally:
        bus.close()
        trials_side.close()
        proxy.close()


@pytest.mark.parametrize("wait", [False, True], ids=["batched", "waiting"])
def test_a_decision_whose_reply_was_lost_still_reaches_the_trial_once(redis_server, wait):
    """The connection drops after Redis ran the trial's round trip (its reports and the read of its
    decisions), before the reply arrived: redis-py sends the round trip again. A pop sent again finds
    nothing, and a PBT exploit is never repeated: the store would name parameters the trainer never
    loaded. The trial must still get the exploit, once. batched: the exploit was already waiting;
    waiting: it is written while the trial's blocking read waits for it."""
    from kubetune.bus.redis_streams import RedisBus

    proxy = CuttingProxy(redis_server.port, [b"cut-exploit"])
    scheduler = RedisBus(url=redis_server.url)
    trial_side = RedisBus(url=proxy.url)
    exploit = Decision("exploit", "cut-exploit", donor=1, params={"lr": 0.1}, donor_step=1)
    client = TrialClient(trial_side, EXP, 0, batch=1, wait=wait, wait_s=30)
    try:
        if wait:
            th = answer_when_reported(scheduler, exploit)
            got = client.send_report(1, {"acc": 0.1})
            th.join()
        else:
            assert client.send_report(1, {"acc": 0.1}).action == "continue"
            scheduler.decide(EXP, [(0, 1, exploit)])
            got = client.send_report(2, {"acc": 0.2})
        assert proxy.cuts == [b"cut-exploit"]  # the reply holding the exploit was lost
        assert got == exploit and client.errors == 0
        scheduler.decide(EXP, [(0, 3, Decision())])
        assert client.send_report(3, {"acc": 0.3}).action == "continue"  # handed out once
        assert trial_side.take_decisions(EXP, 0) == []  # and not read again by the bus either
    finally:
        trial_side.close()
        scheduler.close()
        proxy.close()


@pytest.mark.parametrize("wait", [False, True], ids=["batched", "waiting"])
def test_decisions_popped_while_redis_refuses_reports_are_not_lost(redis_server, wait):
    """Out of memory (maxmemory, noeviction), Redis refuses the reports (XADD) but still pops the trial's
    decisions in the same round trip. The client keeps the reports to send again; the decisions must
    not be dropped with the error: an exploit lost so is recorded as applied, yet never acted on."""
    from kubetune.bus.redis_streams import RedisBus

    bus = RedisBus(url=redis_server.url)
    exploit = Decision("exploit", "bottom", donor=1, params={"lr": 0.1})
    client = TrialClient(bus, EXP, 0, batch=1, wait=wait, wait_s=0.2)
    assert client.send_report(1, {"acc": 0.1}).action == "continue"
    bus.decide(EXP, [(0, 1, exploit)])
    bus.r.config_set("maxmemory", 1)
    try:
        refused = client.send_report(2, {"acc": 0.2})
    finally:
        bus.r.config_set("maxmemory", 0)
    assert client.errors == 1 and refused.action == "continue"
    assert client.send_report(3, {"acc": 0.3}) == exploit
    assert [m.report.seq for m in bus.read(EXP, "c0", count=10)] == [1, 2, 3]  # report 2 sent again
    bus.close()


def loop_thread(bus, study):
    """A running scheduler loop over `study`; returns (loop, stop event, thread)."""
    loop = SchedulerLoop(bus, EXP, StudyHandler(study, "acc"), consumer="c0")
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop, 0.05), daemon=True)
    runner.start()
    return loop, stop, runner


def test_a_lost_attempts_pod_still_reporting_is_stopped_and_never_mixes_with_the_retry(bus):
    """The operator retried trial 0 (its node was cut off) while the first pod still runs there. The old
    pod's reports are not the trial's any more: it hears `stop`, and the new attempt neither gets its
    values in its history nor its answers in its queue, nor loses its own to the old pod."""
    study = Study(parameters=PARAMS, goal="maximize", seed=7, early_stopping=ASHA)
    trial = study.ask()
    trial.state = TrialState.RUNNING
    old = TrialClient(bus, EXP, 0, wait=True, wait_s=5)
    loop, stop, runner = loop_thread(bus, study)
    try:
        assert old.send_report(1, {"acc": 0.9}).action == "continue"
        trial.start_over(2)  # what the operator's retry does to the record
        trial.state = TrialState.RUNNING
        new = TrialClient(bus, EXP, 0, attempt=2, wait=True, wait_s=5)
        assert new.send_report(1, {"acc": 0.2}).action == "continue"
        stopped = old.send_report(2, {"acc": 0.95})
        assert stopped.stop and "superseded" in stopped.reason and "attempt 2" in stopped.reason
        assert new.send_report(2, {"acc": 0.3}).action == "continue"  # its own answer, not the old pod's stop
        loop.catch_up()
        assert trial.intermediate == [[1.0, 0.2], [2.0, 0.3]] and trial.attempt == 2
        assert trial.state == TrialState.RUNNING
    finally:
        stop.set()
        runner.join(10)


def test_a_report_of_an_attempt_the_scheduler_was_not_told_of_starts_the_trial_over(bus):
    """The retry's notice to the scheduler failed (the service was restarting): the new pod's first
    report shows the trial runs again, so the lost attempt's values are dropped, not continued."""
    study = Study(parameters=PARAMS, goal="maximize", seed=7)
    trial = study.ask()
    trial.state = TrialState.RUNNING
    loop, stop, runner = loop_thread(bus, study)
    try:
        first = TrialClient(bus, EXP, 0, wait=True, wait_s=5)
        for step in (1, 2, 3):
            first.send_report(step, {"acc": step / 10})
        retried = TrialClient(bus, EXP, 0, attempt=2, wait=True, wait_s=5)
        assert retried.send_report(1, {"acc": 0.5}).action == "continue"
        loop.catch_up()
        assert trial.attempt == 2 and trial.intermediate == [[1.0, 0.5]]
    finally:
        stop.set()
        runner.join(10)


def test_a_report_from_a_client_without_attempts_is_read_as_the_first_attempt(redis_server):
    """Pods built with an older SDK send [trial, seq, step, metrics]: still reports, of attempt 1."""
    from kubetune.bus.redis_streams import RedisBus

    bus = RedisBus(url=redis_server.url)
    try:
        key = bus.stream_key(EXP)
        bus.r.xadd(key, {"r": '[4,1,1.0,{"acc":0.5}]'})
        bus.publish(EXP, [Report(4, 1, 1.0, {"acc": 0.5}, 3)])
        bus.r.xadd(key, {"r": '[4,2,2.0,{"acc":0.5},0]'})  # no such attempt: skipped as not a report
        got = bus.read(EXP, "c0", count=10)
        assert [m.report for m in got] == [Report(4, 1, 1.0, {"acc": 0.5}), Report(4, 1, 1.0, {"acc": 0.5}, 3)]
        assert [m.report.address for m in got] == [4, "4.3"]
        # The odd entry was acknowledged, not left pending to come back at every recovery.
        assert [m.id for m in bus.read(EXP, "c0", pending=True)] == [m.id for m in got]
    finally:
        bus.close()


def test_a_trial_ending_while_redis_restarts_still_delivers_its_last_reports(redis_server):
    """The last reports hold a trial's final values: a client closing while Redis is down keeps
    trying until it is back (within close_retry_s), rather than dropping them with the process."""
    from kubetune.bus.redis_streams import RedisBus

    bus = RedisBus(url=redis_server.url)
    try:
        client = TrialClient(bus, EXP, 0, batch=100, flush_s=3600, close_retry_s=60)
        for step in (1, 2, 3):
            client.send_report(step, {"acc": step / 10})  # buffered
        redis_server.kill()
        closing = threading.Thread(target=client.close)
        closing.start()
        closing.join(1.0)
        assert closing.is_alive(), "gave up at once"
        redis_server.restart(keep_data=True)
        closing.join(60)
        assert not closing.is_alive()
        assert [m.report.step for m in bus.read(EXP, "c0", count=10)] == [1.0, 2.0, 3.0]
    finally:
        bus.close()


def test_the_bus_speaks_tls_and_verifies_the_server(redis_server_factory):
    """rediss:// with the CA that signed the server's certificate: reports and decisions go through.
    Without that CA the certificate is refused (verification is on, never silently skipped)."""
    import redis as redis_py

    from kubetune.bus.redis_streams import RedisBus

    server = redis_server_factory(tls=True)
    assert server.url.startswith("rediss://")
    bus = RedisBus(url=server.url, ca_file=str(server.ca_file))
    try:
        loop = SchedulerLoop(bus, EXP, lambda m: Decision("stop", "over TLS"), consumer="c0")
        client = TrialClient(bus, EXP, 0, batch=1)
        client.send_report(1, {"acc": 0.5})
        assert loop.drain() == 1
        assert client.flush().reason == "over TLS"
    finally:
        bus.close()
    untrusted = RedisBus(url=server.url)
    with pytest.raises(redis_py.ConnectionError, match="certificate verify failed"):
        untrusted.publish(EXP, reports(0, 1))
    untrusted.close()
