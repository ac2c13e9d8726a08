"""The suggestion service: one Deployment for all experiments, HTTP/JSON.

    GET  /healthz, /readyz
    POST /v1/suggest      {experiment, document, seed, prior, trials, count, new} -> {suggestions, exhausted, epoch}
                          (new: how many may be new configurations; the others only paused trials
                          resumed, answered with resume: true and their events; pruned: paused trials
                          that lost for good while the scheduler picked)
                          or {experiment, epoch, changed, total, count}: only the trials changed since
                          (answered {resync: true} when this service no longer holds that epoch)
    POST /v1/flush        {experiment, document, seed, prior, trials, trial, ended} -> that trial's reported values
                          (ended: its pod is gone; a synchronous PBT population stops waiting for it;
                          attempt: the trial runs again from the start as that attempt, its pod lost)
    POST /v1/forget       {experiment} -> drops the experiment and its bus keys (the finalizer calls it;
                          with a uid, only that incarnation's: one created again under the name stays)

It also hosts one scheduler loop per experiment: reports from the metric bus
(Redis) go to the experiment's Study and scheduler, decisions go back to the
trials, and reported values are written to the Trial resources before the bus
is acknowledged, so a restart of this service loses nothing it acknowledged.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from ..api.trial import Trial, TrialState, paused_reason
from ..bus.base import experiment_key
from .brains import Brain, Brains

log = logging.getLogger("kubetune.suggestion")


class SuggestionService:
    def __init__(self, bus=None, write_trials: Callable[[str, list[Trial]], None] | None = None):
        """bus: a kubetune.bus MetricBus (None: no scheduling); write_trials(namespace, trials) persists."""
        self.bus = bus
        self.write_trials = write_trials
        self.brains = Brains(on_new=self._start_loop)
        self._loops: dict[str, tuple[threading.Event, threading.Thread, Any]] = {}
        self.ready = threading.Event()

    # -- requests ------------------------------------------------------------

    def suggest(self, req: dict) -> dict:
        if "changed" in req:  # only what changed since the request that returned this epoch
            brain = self.brains.get(_key(req["experiment"]))
            if brain is None or brain.epoch != req.get("epoch"):
                return {"resync": True}
            with brain.lock:
                if not brain.update([Trial.from_dict(t) for t in req["changed"]], int(req["total"])):
                    return {"resync": True}
                suggestions, exhausted, pruned = brain.suggest(int(req.get("count", 1)), _new(req))
        else:
            brain = self._brain(req)
            with brain.lock:
                brain.sync([Trial.from_dict(t) for t in req.get("trials", [])])
                suggestions, exhausted, pruned = brain.suggest(int(req.get("count", 1)), _new(req))
        return {"suggestions": suggestions, "exhausted": exhausted, "pruned": pruned, "epoch": brain.epoch}

    def flush(self, req: dict) -> dict:
        key = _key(req["experiment"])
        brain = self._brain(req) if "document" in req else self.brains.get(key)
        if brain is None:
            return {"known": False}
        if "trials" in req:
            with brain.lock:
                brain.sync([Trial.from_dict(t) for t in req["trials"]])
        loop = self._loops.get(key)
        if loop is not None:
            loop[2].catch_up()  # take what the trial sent just before it exited
        number = int(req["trial"])
        with brain.lock:
            if not 0 <= number < len(brain.study.trials):
                return {"known": False}
            t = brain.study.trials[number]
            attempt = int(req.get("attempt") or 0)
            restarted = attempt > t.attempt
            if restarted:  # what the lost attempt reported must not be continued by the new one
                t.start_over(attempt)
                brain.dirty.discard(number)
            # The loop hands out the decisions this releases; an undone exploit changed its parameters.
            undone = req.get("ended") and brain.study.ended(t)
            if undone:
                brain.dirty.add(number)
            reply = {"known": True, "intermediate": t.intermediate, "metrics": t.metrics, "state": t.state.value,
                     "reason": paused_reason(t) if t.state == TrialState.PAUSED else t.reason}
        if undone:
            self._persist(brain)  # before the operator records the trial as finished
        return reply

    def forget(self, req: dict) -> dict:
        exp = req["experiment"]
        key, uid = _key(exp), exp.get("uid", "")
        brain = self.brains.get(key)
        if brain is None or not uid or brain.uid == uid:  # (else it was created again since: keep the new one)
            self.brains.drop(key)
            loop = self._loops.pop(key, None)
            if loop is not None:
                loop[0].set()
                loop[1].join(timeout=5)
        if self.bus is not None:
            self.bus.delete_experiment(experiment_key(exp["namespace"], exp["name"], uid))
        return {"forgotten": key}

    def _brain(self, req: dict) -> Brain:
        exp = req["experiment"]
        return self.brains.ensure(_key(exp), exp.get("uid", ""), req["document"], int(req["seed"]),
                                  [Trial.from_dict(t) for t in req.get("prior", [])])

    # -- scheduler loops -----------------------------------------------------

    def _start_loop(self, brain: Brain) -> None:
        if self.bus is None:
            return
        from ..bus import SchedulerLoop, StudyHandler, number_of

        old = self._loops.pop(brain.key, None)
        if old is not None:  # its experiment was created again, or its search changed
            old[0].set()
            old[1].join(timeout=5)  # a read still in flight would make its keys again after they are forgotten
        handler = StudyHandler(brain.study, brain.metric, brain.lock)

        def handle(msg):
            decision = handler(msg)
            brain.dirty.add(msg.report.trial)
            return decision

        def released():
            late = handler.released()
            brain.dirty.update(number_of(a) for a, _, _ in late)  # an exploit changed its parameters
            return late

        loop = SchedulerLoop(self.bus, brain.bus_key, handle, consumer="suggestion",
                             persist=lambda: self._persist(brain), released=released)
        stop = threading.Event()
        thread = threading.Thread(target=loop.run, args=(stop,), kwargs={"on_error": self._bus_error},
                                  name=f"scheduler {brain.key}", daemon=True)
        self._loops[brain.key] = (stop, thread, loop)
        thread.start()

    def _persist(self, brain: Brain) -> None:
        if self.write_trials is None or not brain.dirty:
            return
        with brain.lock:
            changed = [brain.study.trials[n] for n in sorted(brain.dirty) if n < len(brain.study.trials)]
            brain.dirty.clear()
        self.write_trials(brain.key.split("/", 1)[0], changed)

    @staticmethod
    def _bus_error(e: Exception) -> None:
        log.warning("metric bus: %s", e)

    def close(self) -> None:
        for stop, thread, _ in self._loops.values():
            stop.set()
        for _, thread, _ in self._loops.values():
            thread.join(timeout=5)


def _new(req: dict) -> int | None:
    """How many of the trials asked for may be new configurations (the rest only paused ones resumed)."""
    return None if req.get("new") is None else int(req["new"])


def _key(exp: dict) -> str:
    return f"{exp['namespace']}/{exp['name']}"


def serve(service: SuggestionService, host: str = "0.0.0.0", port: int = 8080) -> ThreadingHTTPServer:
    routes = {"/v1/suggest": service.suggest, "/v1/flush": service.flush, "/v1/forget": service.forget}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz" or (self.path == "/readyz" and service.ready.is_set()):
                self._reply(200, {"ok": True})
            else:
                self._reply(503 if self.path == "/readyz" else 404, {"ok": False})

        def do_POST(self):
            route = routes.get(self.path)
            if route is None:
                return self._reply(404, {"error": f"no route {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._reply(200, route(body))
            except (KeyError, ValueError, TypeError) as e:
                self._reply(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                log.exception("request %s failed", self.path)
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="suggestion-http", daemon=True).start()
    service.ready.set()
    return server
