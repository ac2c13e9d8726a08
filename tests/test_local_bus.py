"""`kubetune run --redis URL`: trial processes report over Redis Streams, as pods do.

Real redis-server (tests/redis_server.py), real trial processes, real files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from tests.redis_server import free_port
from tests.test_local_run import TRIALS, journal, kubetune, wait_for, write_spec


def redis_client(server):
    return server.client(socket_timeout=5)


def bus_keys(server) -> list[str]:
    with redis_client(server) as r:
        return sorted(k.decode() for k in r.scan_iter(match="kubetune:{local/*", count=1000))


def command_calls(server, command: str) -> int:
    with redis_client(server) as r:
        return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def curve(x: float, step: int) -> float:
    """What tests/trials/curve.py reports at a step."""
    return (1.0 - (x - 0.3) ** 2) * (1 - 0.5 ** step)


def curve_spec(tmp_path, name, *, trials=9, parallel=3, steps=9, step_seconds=0.05, early_stopping=True):
    spec = {
        "objective": {"metric": "score", "goal": "maximize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "algorithm": {"name": "sobol", "settings": {"seed": 3}},
        "budget": {"maxTrials": trials, "parallelTrials": parallel},
        "trialTemplate": {"command": ["python", str(TRIALS / "curve.py")],
                          "env": [{"name": "STEPS", "value": str(steps)},
                                  {"name": "STEP_SECONDS", "value": str(step_seconds)}]},
    }
    if early_stopping:
        spec["earlyStopping"] = {"name": "asha", "settings": {"resource": "step", "min": 1, "max": steps,
                                                             "reductionFactor": 3}}
    return write_spec(tmp_path / f"{name}.yaml", name, spec)


def check_curves(records: dict, steps: int) -> None:
    """Every value a trial reported reached the engine once, in order, and its result is its best."""
    for r in records.values():
        seen = r["intermediate"]
        assert [s for s, _ in seen] == list(range(1, len(seen) + 1)), r["name"]
        assert all(v == curve(r["params"]["x"], s) for s, v in seen), r["name"]
        assert r["value"] == max(v for _, v in seen)
        if r["state"] == "Succeeded":
            assert len(seen) == steps


def test_asha_over_redis_prunes_through_the_bus_and_cleans_up(tmp_path, redis_server):
    spec = curve_spec(tmp_path, "asha-bus")
    state = tmp_path / "state"
    result = kubetune("run", str(spec), "--redis", redis_server.url, "--json", "--state-dir", str(state),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "Succeeded" and summary["trials"] == 9
    records = journal(state, "asha-bus")
    pruned = [r for r in records.values() if r["state"] == "Pruned"]
    assert pruned and summary["counts"]["Succeeded"] + len(pruned) == 9
    # Each pruned trial heard its stop (over Redis: there is no other channel) and left by itself, before
    # its last step, rather than being killed after the grace the runner gives an SDK trial.
    assert all("exited with code" not in r["reason"] for r in pruned)
    assert all(len(r["intermediate"]) < 9 for r in pruned)
    check_curves(records, 9)
    # Reports went in as stream entries, read by the consumer group; decisions came back through each
    # trial's decision stream, read from where the trial left off.
    assert command_calls(redis_server, "xadd") >= sum(len(r["intermediate"]) for r in records.values())
    assert command_calls(redis_server, "xreadgroup") > 0 and command_calls(redis_server, "xread") > 0
    # The run deleted its keys; the stream's name is kept in the experiment's state for a resume.
    assert bus_keys(redis_server) == []
    run_id = json.loads((state / "asha-bus" / "state.json").read_text())["bus_run"]
    assert run_id


def test_trials_get_the_bus_in_their_environment_and_not_the_socket(tmp_path, redis_server):
    spec = write_spec(tmp_path / "exp.yaml", "env-bus", {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 0.1}],
        "budget": {"maxTrials": 1},
        "trialTemplate": {"command": ["python", str(TRIALS / "echo_args.py")]},
    })
    state = tmp_path / "state"
    env = {"KUBETUNE_CHANNEL": "/nonexistent/inherited.sock"}
    result = kubetune("run", str(spec), "--redis", redis_server.url, "--state-dir", str(state), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    (record,) = journal(state, "env-bus").values()
    seen = json.loads((state / "env-bus" / "trials" / record["name"] / "seen.json").read_text())["env"]
    run_id = json.loads((state / "env-bus" / "state.json").read_text())["bus_run"]
    assert seen["KUBETUNE_REDIS_URL"] == redis_server.url
    assert seen["KUBETUNE_BUS_KEY"] == f"local/env-bus/{run_id}"
    assert seen["KUBETUNE_ATTEMPT"] == "1" and seen["KUBETUNE_TRIAL"] == "0"
    assert "KUBETUNE_CHANNEL" not in seen and "KUBETUNE_REDIS_PASSWORD" not in seen
    assert record["value"] == record["params"]["lr"]  # its stdout metric line still counts


def test_password_from_the_environment_reaches_redis_and_the_trials(tmp_path, redis_server_factory):
    server = redis_server_factory(password="s3cret")
    spec = curve_spec(tmp_path, "pw-bus", trials=2, parallel=2, steps=3, early_stopping=False)
    state = tmp_path / "state"
    result = kubetune("run", str(spec), "--redis", server.url, "--redis-password-env", "KT_PW", "--json",
                      "--state-dir", str(state), cwd=tmp_path, env={"KT_PW": "s3cret"})
    assert result.returncode == 0, result.stderr
    records = journal(state, "pw-bus")
    assert all(r["state"] == "Succeeded" for r in records.values())
    check_curves(records, 3)
    assert command_calls(server, "xadd") >= 6
    # Without the password the server refuses: a clear error, before anything starts.
    refused = kubetune("run", str(spec), "--redis", server.url, "--state-dir", str(tmp_path / "other"),
                       cwd=tmp_path)
    assert refused.returncode == 2 and "cannot reach Redis at" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_run_over_tls_verifies_the_server_with_the_ca_given(tmp_path, redis_server_factory):
    """rediss:// and --redis-ca: the runner and every trial (KUBETUNE_REDIS_CA_FILE) verify the server."""
    server = redis_server_factory(tls=True)
    spec = curve_spec(tmp_path, "tls-bus", trials=2, parallel=2, steps=3, early_stopping=False)
    state = tmp_path / "state"
    result = kubetune("run", str(spec), "--redis", server.url, "--redis-ca", str(server.ca_file), "--json",
                      "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = journal(state, "tls-bus")
    assert all(r["state"] == "Succeeded" for r in records.values())
    check_curves(records, 3)
    assert command_calls(server, "xadd") >= 6  # the trials reported over TLS
    untrusted = kubetune("run", str(spec), "--redis", server.url, "--state-dir", str(tmp_path / "other"), cwd=tmp_path)
    assert untrusted.returncode == 2 and "certificate verify failed" in untrusted.stderr
    missing = kubetune("run", str(spec), "--redis", server.url, "--redis-ca", str(tmp_path / "nope.crt"),
                       "--state-dir", str(tmp_path / "other"), cwd=tmp_path)
    assert missing.returncode == 2 and "--redis-ca: no such file" in missing.stderr


@pytest.mark.parametrize("keep_data", [True, False], ids=["aof-kept", "redis-data-lost"])
def test_a_redis_restart_mid_run_loses_no_finished_result(tmp_path, redis_server, keep_data):
    steps = 30
    spec = curve_spec(tmp_path, "outage", trials=6, parallel=2, steps=steps, step_seconds=0.1,
                      early_stopping=False)
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(spec), "--redis", redis_server.url,
                             "--json", "--state-dir", str(state)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def mid_run():
            # Two trials finished, and each running trial well inside its curve (the newest entries on the
            # stream say how far), so that none ends while Redis is down: a trial that exits then takes
            # the reports it could not send with it (its value would come from fewer steps).
            records = journal(state, "outage")
            if sum(r["state"] == "Succeeded" for r in records.values()) < 2:
                return False
            running = {n for n, r in records.items() if r["state"] == "Running"}
            if not running:
                return False
            with redis_client(redis_server) as r:
                keys = [k for k in r.scan_iter(match="kubetune:{local/outage/*}:reports")]
                if not keys:
                    return False
                last = {}
                for _, fields in r.xrevrange(keys[0], count=50):
                    trial, _, step = json.loads(fields[b"r"])[:3]
                    last.setdefault(trial, step)
            return all(n in last and 3 <= last[n] <= steps - 12 for n in running)
        wait_for(mid_run, 120, "two finished trials and the running ones mid-curve")
        finished_before = {n: r for n, r in journal(state, "outage").items() if r["state"] == "Succeeded"}
        redis_server.restart(keep_data=keep_data)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["counts"]["Succeeded"] == 6
    final = journal(state, "outage")
    for n, before in finished_before.items():
        assert final[n] == before  # kept as it was
    if keep_data:
        # Reports sent while Redis was down were buffered by the trials and sent once it was back; those
        # read again after the restart (unacknowledged) were applied once.
        check_curves(final, steps)
    else:
        # Reports that were on the stream when its data went are lost (intermediate values, never a result):
        # what arrived is in order, and each trial ran to its end.
        for r in final.values():
            got = [s for s, _ in r["intermediate"]]
            assert got == sorted(set(got)) and got[-1] == steps
            assert r["value"] == curve(r["params"]["x"], steps)
    assert bus_keys(redis_server) == []


def test_a_state_from_before_the_bus_gets_a_run_id_on_resume(tmp_path, redis_server):
    spec = curve_spec(tmp_path, "old-state", trials=2, parallel=1, steps=2, early_stopping=False)
    state = tmp_path / "state"
    first = kubetune("run", str(spec), "--state-dir", str(state), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    path = state / "old-state" / "state.json"
    saved = json.loads(path.read_text())
    saved.pop("bus_run", None)  # as written before local runs had a stream
    path.write_text(json.dumps(saved))
    doc = spec.read_text().replace("maxTrials: 2", "maxTrials: 3")  # more budget: the run goes on
    spec.write_text(doc)
    again = kubetune("run", str(spec), "--redis", redis_server.url, "--state-dir", str(state), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(path.read_text())["bus_run"]
    assert len(journal(state, "old-state")) == 3


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0", "redis://:hunter2@127.0.0.1:{port}/0",
                                 "notascheme://nowhere"])
def test_an_unreachable_redis_is_a_clear_error_before_any_trial_starts(tmp_path, url):
    url = url.format(port=free_port())
    spec = curve_spec(tmp_path, "unreachable", trials=1, parallel=1, steps=1, early_stopping=False)
    state = tmp_path / "state"
    started = time.monotonic()
    result = kubetune("run", str(spec), "--redis", url, "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot reach Redis at" in result.stderr and "Traceback" not in result.stderr
    assert url.replace("hunter2", "***") in result.stderr and "hunter2" not in result.stderr
    assert not state.exists()  # nothing started, nothing written
    assert time.monotonic() - started < 30


def test_synchronous_pbt_over_redis_holds_each_check_until_the_population_catches_up(tmp_path, redis_server):
    """As test_local_run's synchronous PBT test, over the bus: a held answer goes back to the loop as
    `wait`, and the decision made later reaches the waiting trial through its decision queue."""
    from tests.test_local_run import check_synch_pbt, synch_pbt_spec

    path = write_spec(tmp_path / "synch.yaml", "synch-bus", synch_pbt_spec())
    started = time.monotonic()
    result = kubetune("run", str(path), "--redis", redis_server.url, "--json", "--state-dir", str(tmp_path / "state"),
                      cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60  # no trial waited out a hold for the member that died
    check_synch_pbt(journal(tmp_path / "state", "synch-bus"))
    # Each report waited for its own answer on the bus (XREAD BLOCK on its decision stream).
    assert command_calls(redis_server, "xread") > 0
    assert bus_keys(redis_server) == []


def test_a_trial_is_judged_with_the_reports_its_client_flushes_as_it_exits(tmp_path, redis_server):
    """Reports sent every step without a pause are batched by the trial's client, and the last batch
    is sent as the process exits: its exit must reach the engine only after those reports."""
    steps = 95  # the client sends batches of 32 (the first report alone): the last 30 go at the exit
    spec = curve_spec(tmp_path, "flush-at-exit", trials=8, parallel=4, steps=steps, early_stopping=False)
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["trialTemplate"]["command"] = ["python", str(TRIALS / "quick_exit.py")]
    spec.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"
    result = kubetune("run", str(spec), "--redis", redis_server.url, "--json", "--state-dir", str(state),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = journal(state, "flush-at-exit")
    assert len(records) == 8 and all(r["state"] == "Succeeded" for r in records.values())
    check_curves(records, steps)  # every trial: all its values


def one_trial_engine():
    """An engine with trial 0 started, as the runner's main loop holds it."""
    from kubetune.api.spec import ExperimentSpec
    from kubetune.engine import Engine
    from kubetune.study import Study

    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "twice"}, "spec": {
        "objective": {"metric": "loss", "goal": "minimize"},
        "parameters": [{"name": "x", "type": "double", "min": 0, "max": 1}],
        "budget": {"maxTrials": 1}, "trialTemplate": {"command": ["true"]}}}
    spec = ExperimentSpec.from_document(doc)
    study = Study(parameters=spec.parameters, algorithm=spec.algorithm, goal=spec.objective.goal)
    engine = Engine(spec, study, 0.0)
    assert len(engine.step(0.0)) == 1
    engine.on_started(0, 0.0)
    return engine


def bridged(engine, bus, sent):
    """Runs a bridge over `bus` until the reports `sent` are handled, the main loop's part done here."""
    import queue
    import types

    from kubetune.runtime.bridge import BusBridge
    from kubetune.runtime.runner import _handle

    runtime = types.SimpleNamespace(waiting={}, stop=lambda *a, **k: None)
    events = queue.Queue()
    bridge = BusBridge(bus, "k", events)
    bridge.start()
    try:
        bus.publish("k", sent)
        target = bridge.last_id()
        deadline = time.monotonic() + 30
        while not bridge.handled(target):
            assert time.monotonic() < deadline, "the loop did not handle the reports"
            try:
                _handle(engine, runtime, events.get(timeout=0.1), 0.0)
            except queue.Empty:
                pass
    finally:
        bridge.close(delete=False)


def test_the_bridge_applies_a_report_read_twice_once_and_answers_unknown_trials_stop():
    """In process, over MemoryBus: the bus delivers at least once, so the same report may reach the
    engine twice; and anyone with the bus can write to the stream."""
    from kubetune.bus import MemoryBus, Report

    engine, bus = one_trial_engine(), MemoryBus()
    same = Report(0, 1, 1.0, {"loss": 0.5})
    bridged(engine, bus, [same, same, Report(0, 2, 2.0, {"loss": 0.25}), same, Report(7, 1, 1.0, {"loss": 0.1})])
    assert engine.trials[0].intermediate == [[1.0, 0.5], [2.0, 0.25]]
    assert [d.action for _, d in bus.take_decisions("k", 0)] == ["continue"]  # coalesced: the latest
    ((_, stray),) = bus.take_decisions("k", 7)
    assert stray.stop and "no trial number 7" in stray.reason


def test_a_process_of_an_earlier_run_still_reporting_is_stopped_and_not_applied():
    """`kubetune run` killed with kill -9 leaves its trial processes running (each in its own session).
    Resumed, the run starts those trials again as new attempts; the old processes' reports must not
    enter the new attempts' histories, and they hear that they were superseded."""
    from kubetune.bus import MemoryBus, Report

    engine, bus = one_trial_engine(), MemoryBus()
    engine.trials[0].attempt = 2  # what the resumed run's start_over made of it
    bridged(engine, bus, [Report(0, 1, 1.0, {"loss": 0.5}, 2), Report(0, 7, 7.0, {"loss": 0.01}, 1),
                          Report(0, 2, 2.0, {"loss": 0.25}, 2)])
    assert engine.trials[0].intermediate == [[1.0, 0.5], [2.0, 0.25]]
    ((_, old),) = bus.take_decisions("k", 0)
    assert old.stop and old.reason == "superseded: the trial runs again as attempt 2"
    assert [d.action for _, d in bus.take_decisions("k", "0.2")] == ["continue"]


def test_successive_halving_over_redis_pauses_and_resumes_each_step_once(tmp_path, redis_server):
    """Synchronous SHA over the bus: every report waits for its decision (KUBETUNE_REPORT_WAIT), so a
    trainer reporting every 20 ms that knows no budget stops at the report it is paused at, and its
    resumed run goes on right after it; batched, it trained (and checkpointed) a step or more further,
    reports the record never took (answered `pause`), and its resumed run skipped them."""
    spec_path = curve_spec(tmp_path, "sha-bus", step_seconds=0.02, early_stopping=False)
    doc = yaml.safe_load(spec_path.read_text())
    doc["spec"]["earlyStopping"] = {"name": "sha", "settings": {"resource": "step", "min": 1, "max": 9,
                                                                "reductionFactor": 3}}
    doc["spec"]["trialTemplate"]["env"].append({"name": "IGNORE_BUDGET", "value": "1"})  # stops only on pause
    spec_path.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"
    result = kubetune("run", str(spec_path), "--redis", redis_server.url, "--json", "--state-dir", str(state),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    counts = {k: v for k, v in summary["counts"].items() if v}
    assert summary["status"] == "Succeeded" and counts == {"Succeeded": 1, "Pruned": 8}, summary
    records = journal(state, "sha-bus")
    for r in records.values():  # every step once, in order, across its runs
        seen = r["intermediate"]
        assert seen == [[s, curve(r["params"]["x"], s)] for s in range(1, len(seen) + 1)], r["name"]
    assert sorted(len(r["intermediate"]) for r in records.values()) == [1] * 6 + [3, 3, 9]


def test_a_trainer_that_ignores_a_pause_resumes_from_the_checkpoint_of_the_step_it_was_paused_at(tmp_path):
    """Synchronous SHA, with a trainer that trains and saves 4 steps past each pause before it exits. Its
    resumed run must start from the checkpoint saved at the step it was paused at, not from its latest
    (4 steps on): the record holds every step once, in order, and the model was trained exactly as far."""
    spec_path = curve_spec(tmp_path, "sha-stubborn", step_seconds=0.02, early_stopping=False)
    doc = yaml.safe_load(spec_path.read_text())
    doc["spec"]["earlyStopping"] = {"name": "sha", "settings": {"resource": "step", "min": 1, "max": 9,
                                                                "reductionFactor": 3}}
    doc["spec"]["trialTemplate"]["env"].append({"name": "IGNORE_PAUSE", "value": "4"})
    spec_path.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"
    result = kubetune("run", str(spec_path), "--json", "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "Succeeded", summary
    records = journal(state, "sha-stubborn")
    for r in records.values():  # every step once, in order, across its runs
        seen = r["intermediate"]
        assert seen == [[s, curve(r["params"]["x"], s)] for s in range(1, len(seen) + 1)], r["name"]
    assert sorted(len(r["intermediate"]) for r in records.values()) == [1] * 6 + [3, 3, 9]
    [winner] = [r for r in records.values() if len(r["intermediate"]) == 9]
    log = (state / "sha-stubborn" / "trials" / winner["name"] / "output.log").read_text()
    starts = [line for line in log.splitlines() if line.startswith("starting after")]
    assert starts == ["starting after step 0, running to step 1", "starting after step 1, running to step 3",
                      "starting after step 3, running to step 9"], log
