"""The local report channel: trials' SDK calls reach the runner over a Unix socket.

Each message is one JSON line, {"trial": 3, "step": 1, "metrics": {...}}, and is
answered with one JSON line, the scheduler's Decision. The socket lives in a
short temporary folder (Unix socket paths are limited to ~100 bytes).

A decision held back (synchronous PBT: the runner first replies `wait`) is
waited for up to HOLD_TIMEOUT, not ANSWER_TIMEOUT: the population may need a
while to catch up (a member that exits releases the others at once). The trial
never sees `wait`; on either timeout it hears `continue` and goes on.
"""

from __future__ import annotations

import json
import queue
import shutil
import socketserver
import tempfile
import threading
import time
from pathlib import Path

from ..api.trial import Decision
from .events import Reported

ANSWER_TIMEOUT = 60.0
HOLD_TIMEOUT = 3600.0


class ReportChannel:
    def __init__(self, events: "queue.Queue"):
        self._dir = tempfile.mkdtemp(prefix="kt-")
        self.path = str(Path(self._dir) / "report.sock")
        self._events = events
        channel = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for raw in self.rfile:
                    answer = channel._answer(raw)
                    self.wfile.write((json.dumps(answer) + "\n").encode())
                    self.wfile.flush()

        self._server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="report-channel", daemon=True)
        self._thread.start()

    def _answer(self, raw: bytes) -> dict:
        try:
            msg = json.loads(raw)
            number = int(msg["trial"])
            metrics = {str(k): v for k, v in dict(msg.get("metrics") or {}).items()}
            step = msg.get("step")
        except (ValueError, KeyError, TypeError) as e:
            return {"action": "continue", "error": f"bad report: {e}"}
        answered = threading.Condition()
        box: list[Decision] = []

        def reply(decision: Decision) -> None:
            with answered:
                box.append(decision)
                answered.notify_all()

        self._events.put(Reported(number, metrics, None if step is None else float(step), reply))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        held = False
        with answered:
            while not box or box[-1].wait:
                if box and not held:  # held back until the population catches up
                    held, deadline = True, time.monotonic() + HOLD_TIMEOUT
                left = deadline - time.monotonic()
                if left <= 0:
                    why = "the population did not catch up in time" if held else "no answer from the runner"
                    return {"action": "continue", "error": why}
                answered.wait(left)
            decision = box[-1]
        return decision.to_dict() | {"action": decision.action}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)
