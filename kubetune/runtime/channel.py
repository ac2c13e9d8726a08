"""The local report channel: trials' SDK calls reach the runner over a Unix socket.

Each message is one JSON line, {"trial": 3, "step": 1, "metrics": {...}}, and is
answered with one JSON line, the scheduler's Decision. The socket lives in a
short temporary folder (Unix socket paths are limited to ~100 bytes).
"""

from __future__ import annotations

import json
import queue
import shutil
import socketserver
import tempfile
import threading
from pathlib import Path

from ..api.trial import Decision
from .events import Reported

ANSWER_TIMEOUT = 60.0


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
        done = threading.Event()
        box: list[Decision] = []

        def reply(decision: Decision) -> None:
            box.append(decision)
            done.set()

        self._events.put(Reported(number, metrics, None if step is None else float(step), reply))
        if not done.wait(ANSWER_TIMEOUT):
            return {"action": "continue", "error": "no answer from the runner"}
        return box[0].to_dict() | {"action": box[0].action}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)
