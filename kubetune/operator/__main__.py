"""`python -m kubetune.operator`: the operator's entry point (the chart's operator Deployment)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import kopf

from . import handlers
from .control import Controller
from .kube import Kube, load_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kubetune-operator")
    p.add_argument("--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable); default: all namespaces")
    p.add_argument("--suggestion-url", default=os.environ.get("KUBETUNE_SUGGESTION_URL", "http://kubetune-suggestion:8080"))
    p.add_argument("--redis-url", default=os.environ.get("KUBETUNE_REDIS_URL", ""),
                   help="the metric bus handed to trial pods")
    p.add_argument("--redis-password-secret", default=os.environ.get("KUBETUNE_REDIS_PASSWORD_SECRET", ""),
                   help="NAME:KEY of a Secret in each experiment's namespace holding the Redis password")
    p.add_argument("--redis-ca-secret", default=os.environ.get("KUBETUNE_REDIS_CA_SECRET", ""),
                   help="NAME[:KEY] (KEY defaults to ca.crt) of a Secret in each experiment's namespace holding the "
                        "CA certificate that signed the Redis server's (rediss://): mounted read-only in every "
                        "trial pod, which gets KUBETUNE_REDIS_CA_FILE")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        # kopf logs every handler call at INFO (several per trial); kubetune's own lines say what happened.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    load_config()
    bus = {"url": args.redis_url}
    if args.redis_password_secret:
        name, _, key = args.redis_password_secret.partition(":")
        bus["passwordSecret"] = {"name": name, "key": key or "password"}
    if args.redis_ca_secret:
        name, _, key = args.redis_ca_secret.partition(":")
        bus["caSecret"] = {"name": name, "key": key or "ca.crt"}
    handlers.controller = Controller(Kube(), args.suggestion_url, bus)
    scope = {"namespaces": args.namespace} if args.namespace else {"clusterwide": True}
    # Standalone: one replica; restarts are safe because all state is in the API.
    asyncio.run(_operate(scope))


async def _operate(scope: dict) -> None:
    # Handlers run blocking API calls in threads; the default pool (CPUs + 4) would queue them.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32))
    await kopf.operator(standalone=True, **scope)


if __name__ == "__main__":
    main()
