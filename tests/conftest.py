"""Shared pytest set-up. Fixtures for real servers live in their own modules."""
pytest_plugins = ["tests.cluster.fixtures"]
