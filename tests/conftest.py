"""Shared pytest set-up. Fixtures for real servers live in their own modules:
the Kubernetes test cluster (tests/cluster) and Redis (tests/redis_server.py)."""

pytest_plugins = ["tests.cluster.fixtures", "tests.redis_server", "tests.chart"]

import signal


def pytest_configure(config):
    # A CI timeout or `kill` sends SIGTERM, which would end pytest at once and leave the servers the
    # fixtures started (etcd, kube-apiserver, redis-server: each in its own session) running. As the
    # interrupt that pytest already handles, it tears the fixtures down first.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
