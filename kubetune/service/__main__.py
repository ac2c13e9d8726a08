"""`python -m kubetune.service`: the suggestion service (the chart's suggestion Deployment)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from ..api.trial import Trial, TrialState, paused_reason
from .server import SuggestionService, serve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kubetune-suggestion")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("KUBETUNE_PORT", "8080")))
    p.add_argument("--redis-url", default=os.environ.get("KUBETUNE_REDIS_URL", ""))
    p.add_argument("--redis-password", default=os.environ.get("KUBETUNE_REDIS_PASSWORD") or None)
    p.add_argument("--redis-ca-file", default=os.environ.get("KUBETUNE_REDIS_CA_FILE") or None,
                   help="with a rediss:// URL: the CA certificate that signed the server's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    bus, write = _bus_and_writer(args.redis_url, args.redis_password, args.redis_ca_file)
    service = SuggestionService(bus, write)
    server = serve(service, args.host, args.port)
    logging.getLogger("kubetune.suggestion").info("serving on %s:%d", args.host, server.server_port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.shutdown()
    service.close()


def _bus_and_writer(url: str, password: str | None, ca_file: str | None = None):
    """The Redis metric bus, and how reported values reach the Trial resources; (None, None) without Redis."""
    if not url:
        return None, None
    from kubernetes.client.rest import ApiException

    from ..bus import redis_bus
    from ..operator.kube import Kube, load_config

    load_config()
    kube = Kube()

    def write(namespace: str, trials: list[Trial]) -> None:
        for t in trials:
            # Reported values, and what the scheduler did (PBT's new parameters and its exploits).
            status = {"intermediate": t.intermediate[-1000:], "metrics": t.metrics,
                      "params": t.params, "events": t.events[-200:]}
            if t.state == TrialState.PRUNED:
                status["stop"] = {"state": "Pruned", "reason": t.reason or "pruned"}
            elif t.state == TrialState.PAUSED:  # its pod saves a checkpoint and exits; the operator sees to it
                status["stop"] = {"state": "Paused", "reason": paused_reason(t)}
            try:
                if "stop" in status:
                    _write_with_stop(kube, namespace, t.name, status)
                else:
                    kube.patch_trial_status(namespace, t.name, status)
            except ApiException as e:
                if e.status != 404:  # a trial deleted with its experiment has nothing to keep
                    raise

    return redis_bus(url=url, password=password, ca_file=ca_file), write


def _write_with_stop(kube, namespace: str, name: str, status: dict) -> None:
    """Writes the scheduler's stop (pruned, paused) only where the trial has none yet and runs: a stop the
    operator wrote first (trialTimeout: Failed; the experiment's end: Killed) stands, as the local engine
    keeps the first, or a timed-out trial would end Paused and be resumed."""
    for _ in range(10):
        trial = kube.get_trial(namespace, name)
        if trial is None:
            return
        now = trial.get("status") or {}
        if now.get("stop") or now.get("state") not in (None, "Pending", "Running"):
            kube.patch_trial_status(namespace, name, {k: v for k, v in status.items() if k != "stop"})
            return
        if kube.patch_trial_status(namespace, name, status, resource_version=trial["metadata"]["resourceVersion"]):
            return
    raise RuntimeError(f"trial {name} kept changing while its stop was written")  # (the loop writes it again)


if __name__ == "__main__":
    main()
