"""Shared pytest set-up. Fixtures for real servers live in their own modules:
the Kubernetes test cluster (tests/cluster) and Redis (tests/redis_server.py)."""

pytest_plugins = ["tests.cluster.fixtures", "tests.redis_server", "tests.chart"]
