"""The local runtime: each trial a subprocess on this machine.

A trial runs in its own process group (so stopping it stops its children too)
with its parameters in the command and the environment. A reader thread copies
its output to the trial's log and picks metric lines out of it; a waiter thread
reports its exit only after the reader has drained the last line.

Trials report through the SDK over a Unix socket (the default), or over the
metric bus (`kubetune run --redis`, see bridge.py). A bus trial's exit is held
back until the bus loop has handled every report published before it: the
trial's client flushes its last reports as it exits, and the engine must judge
it with them.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..api.spec import ExperimentSpec
from ..api.template import render_command, trial_env
from ..api.trial import Decision, Trial
from ..engine.metric_lines import parse_metric_line
from ..schedulers import every_report_waits
from ..trial import LOST_REPORTS
from .channel import ReportChannel
from .events import Event, Exited, Reported, Started, Wake
from .orphans import TOKEN_ENV, ProcessBook, popen_dying_with_us

KILL_AFTER = 10.0  # seconds between SIGTERM and SIGKILL
# Longest a bus trial's exit waits for the loop to reach its last reports (the bus down, say):
# then it is judged on what arrived.
EXIT_WAIT = 30.0
_ENDING = Decision("stop", "the run is ending")


@dataclass
class _Proc:
    trial: Trial
    popen: subprocess.Popen
    log_path: Path
    term_at: float | None = None
    kill_at: float | None = None
    term_sent: bool = False
    uses_sdk: bool = False
    tail: list[str] = field(default_factory=list)
    # A bus trial that exited: its Exited event, held until the loop reaches `target` (a stream position).
    exited: Exited | None = None
    target: tuple[int, int] | None = None
    give_up_at: float = 0.0


class LocalRuntime:
    def __init__(self, spec: ExperimentSpec, trial_dir, base_dir: Path, kill_after: float = KILL_AFTER,
                 checkpoints: Path | None = None, bus=None, bus_key: str | None = None,
                 bus_env: dict[str, str] | None = None, exit_wait: float = EXIT_WAIT,
                 processes: Path | None = None):
        """trial_dir: a function giving each trial its own folder; base_dir: default working directory;
        checkpoints: the folder every trial's checkpoints go under (PBT copies between them);
        bus: a MetricBus the trials report over instead of the local socket (under `bus_key`), with
        `bus_env` (its URL, password) in their environment; processes: the file the live trials' process
        groups are kept in, for them to be terminated if the run dies before them (see orphans.py)."""
        self.spec = spec
        self.checkpoints = checkpoints
        self._trial_dir = trial_dir
        self.base_dir = Path(base_dir)
        self.kill_after = kill_after
        self._events: queue.Queue[Event] = queue.Queue()
        self._procs: dict[int, _Proc] = {}
        self.book = ProcessBook(processes, kill_after) if processes is not None else None
        # Trials blocked in report() on a held (synchronous PBT) decision: number -> its reply.
        self.waiting: dict[int, Callable[[Decision], None]] = {}
        kind = spec.collector_kind
        self._read_stdout = kind in ("auto", "stdout")
        sdk = kind in ("auto", "sdk")
        # Without a bus, SDK reports come over the Unix socket straight into the event queue, not through
        # MemoryBus and the bridge: the loop hands reports to its handler one at a time, each a round trip
        # to the main loop, where the socket's threads post concurrently and one pass answers all that is
        # queued (bench/local_channel.py: 2-2.5x fewer reports/s with 8 trials), and the socket's answer
        # is synchronous already, so a trial's exit never overtakes its reports.
        self.channel = ReportChannel(self._events) if sdk and bus is None else None
        self.bridge = None
        self.exit_wait = exit_wait
        self._bus_env: dict[str, str] = {}
        if bus is not None:
            from .bridge import BusBridge

            self._bus_env = {**(bus_env or {}), "KUBETUNE_BUS_KEY": bus_key}
            if every_report_waits(spec.early_stopping, goal=spec.objective.goal, space=spec.space):
                self._bus_env["KUBETUNE_REPORT_WAIT"] = "1"
            if sdk:
                self.bridge = BusBridge(bus, bus_key, self._events)
                self.bridge.start()
            else:
                bus.close()

    # -- the Runtime interface -------------------------------------------------

    def start(self, trial: Trial) -> None:
        folder = self._trial_dir(trial)
        builtins = {"trialName": trial.name, "trialNumber": trial.number, "trialDir": str(folder),
                    "experimentName": self.spec.name}
        names = [p["name"] for p in self.spec.parameters]
        argv = render_command(self.spec.trial_template.command, trial.params, builtins, names)
        if argv[0] in ("python", "python3"):
            # The interpreter running kubetune, so trials can import the SDK without an activated venv.
            argv[0] = sys.executable
        env = dict(os.environ)
        for inherited in ("KUBETUNE_BUDGET", "KUBETUNE_RESUME_STEP"):
            env.pop(inherited, None)  # (kubetune run inside a trial): this trial's own, or none
        # Not the pod's termination log, when kubetune runs inside one: the runner reads what the SDK says
        # from the trial's output.
        env["KUBETUNE_TERMINATION_LOG"] = ""
        env.update({e["name"]: e.get("value", "") for e in self.spec.trial_template.env if "value" in e})
        env.update(trial_env(trial.params, builtins))
        env.update({"KUBETUNE_TRIAL_DIR": str(folder), "PYTHONUNBUFFERED": "1"})
        if self.checkpoints is not None:
            env["KUBETUNE_CHECKPOINT_DIR"] = str(self.checkpoints)
        if trial.budget is not None:
            env["KUBETUNE_BUDGET"] = f"{trial.budget:g}"  # how far this run should go (HyperBand)
        if trial.resumed_from is not None:  # the checkpoint to resume from (see checkpoint.load_bytes)
            env["KUBETUNE_RESUME_STEP"] = f"{trial.resumed_from:g}"
        env["KUBETUNE_ATTEMPT"] = str(trial.attempt)
        if self.book is not None:
            env[TOKEN_ENV] = self.book.token  # (inherited by its children: how they are known as the run's)
        else:
            env.pop(TOKEN_ENV, None)
        if self.channel is not None:
            env["KUBETUNE_CHANNEL"] = self.channel.path
        elif self.bridge is not None:
            env.pop("KUBETUNE_CHANNEL", None)  # (inherited, if kubetune runs inside a trial): the SDK picks the bus
            env.update(self._bus_env)
        cwd = self.base_dir / (self.spec.trial_template.working_dir or ".")
        log_path = folder / "output.log"
        try:
            # Its own process group, and SIGTERM when this process dies (kill -9 too), on Linux.
            popen = popen_dying_with_us(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as e:
            log_path.write_text(f"cannot start {argv!r}: {e}\n")
            self._events.put(Started(trial.number))
            self._events.put(Exited(trial.number, 127, f"cannot start {argv[0]!r}: {e.strerror or e}"))
            return
        proc = _Proc(trial, popen, log_path)
        self._procs[trial.number] = proc
        if self.book is not None:
            self.book.add(trial.number, popen.pid)
        self._events.put(Started(trial.number))
        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        reader.start()
        threading.Thread(target=self._wait, args=(proc, reader), daemon=True).start()

    def stop(self, number: int, grace: float = 0.0) -> None:
        """SIGTERM after `grace` seconds (time to exit on its own), SIGKILL later."""
        proc = self._procs.get(number)
        if proc is None:
            return
        now = time.monotonic()
        if proc.term_sent:
            return  # its SIGKILL is due already: asked again (each report of a trial being stopped is), not put off
        proc.term_at = min(proc.term_at or float("inf"), now + grace)
        proc.kill_at = proc.term_at + self.kill_after
        self._signals(now)

    def events(self, timeout: float) -> list[Event]:
        """Events since the last call; waits up to `timeout` for the first one."""
        self._signals(time.monotonic())
        got: list[Event] = []
        out: list[Event] = self._release_exits()  # held exits the loop has caught up with go at once
        if not out:
            try:
                got.append(self._events.get(timeout=timeout))
            except queue.Empty:
                pass
        try:
            while True:
                got.append(self._events.get_nowait())
        except queue.Empty:
            pass
        for ev in got:
            if isinstance(ev, Wake):
                continue
            if isinstance(ev, Reported) and ev.reply is not None and ev.number in self._procs:
                self._procs[ev.number].uses_sdk = True
            if isinstance(ev, Exited) and self.bridge is not None and ev.number in self._procs:
                proc = self._procs[ev.number]
                proc.exited, proc.give_up_at = ev, time.monotonic() + self.exit_wait
                self.bridge.wake_wanted = True
                continue  # held until the loop has handled the trial's last reports
            out.append(ev)
            if isinstance(ev, Exited):
                self._forget(self._procs.pop(ev.number, None))
        # After the reports taken above: a trial's last reports come before its exit.
        out += self._release_exits()
        return out

    def _release_exits(self) -> list[Exited]:
        """The held exits whose trials' reports the bus loop has all handled (or that waited too long)."""
        held = [p for p in self._procs.values() if p.exited is not None]
        if not held:
            return []
        out = []
        now = time.monotonic()
        last = None
        for proc in held:
            if proc.target is None:
                # Every report published before the exit is at or before the stream's newest entry now.
                last = last or self.bridge.last_id()
                proc.target = last
            if proc.target is not None and self.bridge.handled(proc.target) or now >= proc.give_up_at:
                out.append(proc.exited)
                self._forget(self._procs.pop(proc.trial.number))
        self.bridge.wake_wanted = any(p.exited is not None for p in self._procs.values())
        return out

    def _forget(self, proc: _Proc | None) -> None:
        if proc is not None and self.book is not None:
            self.book.remove(proc.popen.pid)

    @property
    def running(self) -> int:
        return len(self._procs)

    def close(self) -> None:
        for number in list(self._procs):
            self.stop(number)
        deadline = time.monotonic() + self.kill_after + 2
        while self._procs and time.monotonic() < deadline:
            for ev in self.events(0.1):
                if isinstance(ev, Reported) and ev.reply is not None:
                    ev.reply(_ENDING)  # a bus loop waits for the answer (and a trial's exit for the loop)
        if self.channel is not None:
            self.channel.close()
        if self.bridge is not None:
            self.bridge.close()
        if self.book is not None:
            self.book.close()

    # -- threads -------------------------------------------------------------

    def _read(self, proc: _Proc) -> None:
        fmt = self.spec.metric_format
        with proc.log_path.open("a", encoding="utf-8") as log:
            for raw in proc.popen.stdout:
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                if line.strip():
                    proc.tail = (proc.tail + [line.strip()])[-5:]
                if self._read_stdout and not proc.uses_sdk:
                    metrics = parse_metric_line(line, fmt)
                    if metrics:
                        self._events.put(Reported(proc.trial.number, metrics))

    def _wait(self, proc: _Proc, reader: threading.Thread) -> None:
        if hasattr(os, "waitid"):  # (not on macOS: there the group is signalled just after the reaping)
            try:
                # Exited, not reaped yet (so that its group id cannot be reused before the signal below).
                os.waitid(os.P_PID, proc.popen.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass  # reaped already (a poll() on the main thread)
        else:
            proc.popen.wait()
        # The trial ends with its process. Whatever it left in its group (a background job) goes too: it
        # would outlive the run, and while it held the output pipe open the exit was never reported.
        _signal_group(proc.popen, signal.SIGTERM)
        code = proc.popen.wait()
        reader.join(self.kill_after)
        if reader.is_alive():
            _signal_group(proc.popen, signal.SIGKILL)
            reader.join()
        if code < 0:
            error = f"killed by {signal.Signals(-code).name}"
        elif code != 0:
            error = proc.tail[-1] if proc.tail else ""
        else:
            # What the SDK said of reports it could not deliver (not its passing warning that the bus was
            # unreachable: it may have come back and taken them all).
            error = next((line for line in reversed(proc.tail)
                          if line.startswith("kubetune.trial: ") and LOST_REPORTS in line), "")
        self._events.put(Exited(proc.trial.number, code, error, stopped=proc.term_sent))

    def _signals(self, now: float) -> None:
        for proc in list(self._procs.values()):
            if proc.popen.poll() is not None:
                continue
            if proc.kill_at is not None and now >= proc.kill_at:
                _signal_group(proc.popen, signal.SIGKILL)
                proc.kill_at = None
            elif proc.term_at is not None and now >= proc.term_at:
                proc.term_at, proc.term_sent = None, True  # (before the signal: the waiter reads it after the exit)
                _signal_group(proc.popen, signal.SIGTERM)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
