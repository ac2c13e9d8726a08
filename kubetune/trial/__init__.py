"""The trial SDK: what a training script calls.

    from kubetune import trial
    p = trial.params()                       # {"lr": 0.01, "layers": 2, ...}
    for epoch in range(1, 28):
        ...
        if trial.report(step=epoch, val_accuracy=acc).stop:
            break                            # pruned: the scheduler says stop now

Inside `kubetune run`, reports travel over the runner's local channel (a Unix
socket into the runner's memory); with `kubetune run --redis URL`, and in a
cluster pod, over the Redis metric bus (KUBETUNE_REDIS_URL, set by the runner
or the operator). Either way the answer is the scheduler's decision. Run outside any experiment (plain
`python train.py`), `params()` reads KUBETUNE_PARAMS if set, else returns the
defaults you pass, and `report()` prints the metrics and always answers "go on".
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from ..api.trial import CONTINUE, Decision
from . import checkpoint

__all__ = ["Decision", "params", "report", "trial_dir"]

# What the SDK says at exit of reports the bus never got (the runner and the operator take it as the reason).
LOST_REPORTS = "reports never reached the metric bus"

_connection: "_Channel | None" = None


def params(defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """This trial's assigned parameters (over `defaults`, for runs outside an experiment)."""
    assigned = json.loads(os.environ.get("KUBETUNE_PARAMS", "{}"))
    return {**(defaults or {}), **assigned}


def trial_dir() -> str:
    """A folder of this trial's own (outputs, checkpoints)."""
    return os.environ.get("KUBETUNE_TRIAL_DIR", os.getcwd())


def report(step: float | None = None, **metrics: float) -> Decision:
    """Records metrics at a step; returns the scheduler's decision (`.stop` means stop now)."""
    clean = {k: _number(k, v) for k, v in metrics.items()}
    channel = _channel()
    if channel is None:
        shown = " ".join(f"{k}={v}" for k, v in clean.items())
        print(f"step={step} {shown}" if step is not None else shown, flush=True)
        return CONTINUE
    decision = channel.send(step, clean)
    if decision.pause:
        checkpoint.hold(step)  # its resumed run starts from that step's checkpoint, whatever comes after
    return decision


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"kubetune.trial.report: metric {name!r} must be a number, got {value!r}") from None


def _channel():
    global _connection
    if _connection is None and os.environ.get("KUBETUNE_CHANNEL"):
        _connection = _Channel(os.environ["KUBETUNE_CHANNEL"], int(os.environ["KUBETUNE_TRIAL"]))
    elif _connection is None and os.environ.get("KUBETUNE_REDIS_URL"):
        _connection = _BusChannel()
    return _connection


class _BusChannel:
    """Reports over the Redis metric bus; flushed when the process exits.

    Frequent reports (every training step) are batched, and their decisions arrive a
    few reports later. A report that comes after SLOW_S or more without one (once an
    epoch, typically) is sent at once and waits for its own decision (up to the
    client's wait_s): otherwise an ASHA stop at a rung would arrive with the next
    report, after a whole further epoch, and a PBT exploit would be applied an epoch
    late. The wait is one round trip to the scheduler, small next to such a report's
    interval. KUBETUNE_REPORT_WAIT=1 (set by the operator for synchronous PBT, whose checks
    are held until the population catches up, and for schedulers that pause trials, so that
    none trains past the report it was paused at) makes every report wait for its decision.
    """

    SLOW_S = 0.2

    def __init__(self, client=None):
        import atexit

        if client is None:
            from ..bus import TrialClient, redis_bus

            bus = redis_bus(url=os.environ["KUBETUNE_REDIS_URL"],
                            password=os.environ.get("KUBETUNE_REDIS_PASSWORD") or None,
                            ca_file=os.environ.get("KUBETUNE_REDIS_CA_FILE") or None)  # TLS: rediss://
            # The experiment's key on the bus: set by the runner that reads it (a local run over Redis),
            # else namespace/name, as the suggestion service reads it.
            experiment = (os.environ.get("KUBETUNE_BUS_KEY")
                          or f"{os.environ['KUBETUNE_NAMESPACE']}/{os.environ['KUBETUNE_EXPERIMENT']}")
            client = TrialClient(bus, experiment, int(os.environ["KUBETUNE_TRIAL"]),
                                 attempt=int(os.environ.get("KUBETUNE_ATTEMPT") or 1))
            atexit.register(self.close)
        self.client = client
        self._warned = False
        self.always_wait = os.environ.get("KUBETUNE_REPORT_WAIT") == "1"
        self._clock = time.monotonic
        # The channel is made at the first report, which follows the trial's start (an epoch of training,
        # typically): a long stretch without a report, so it waits for its own decision.
        self._last = float("-inf")

    def send(self, step: float | None, metrics: dict[str, float]) -> Decision:
        now = self._clock()
        self.client.wait = self.always_wait or now - self._last >= self.SLOW_S
        self._last = now
        decision = self.client.send_report(step, metrics)
        if self.client.errors and not self._warned:
            self._warned = True
            _say(f"the metric bus is unreachable ({_error(self.client.last_error)}); "
                 "reports are kept and sent again, training goes on")
        return decision

    def close(self) -> None:
        """At exit: sends what is left (waiting a while for the bus). Reports that never got there leave a
        line saying why, on stderr and in the container's termination message, which the trial's reason
        shows: without it, a bus the trial could never reach (a wrong password or CA) reads as a trainer
        that reported nothing."""
        self.client.close()
        if self.client.undelivered:
            message = f"{self.client.undelivered} {LOST_REPORTS}: {_error(self.client.last_error)}"
            _say(message)
            path = os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log")  # ("": none, locally)
            if path and os.path.isfile(path):  # (in a container, Kubernetes mounts it and reads it after the exit)
                try:
                    with open(path, "a") as f:
                        f.write(f"kubetune.trial: {message}\n")
                except OSError:
                    pass


def _say(message: str) -> None:
    print(f"kubetune.trial: {message}", file=sys.stderr, flush=True)


def _error(e: BaseException | None) -> str:
    return "no answer" if e is None else f"{type(e).__name__}: {e}"


class _Channel:
    """One connection to the local runner; each report is one request and one answer."""

    def __init__(self, path: str, number: int):
        self.number = number
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def send(self, step: float | None, metrics: dict[str, float]) -> Decision:
        msg = {"trial": self.number, "step": step, "metrics": metrics}
        self.sock.sendall((json.dumps(msg) + "\n").encode())
        answer = json.loads(self.reader.readline() or b'{"action": "continue"}')
        answer.pop("error", None)
        return Decision.from_dict(answer)
