"""Benchmarks reuse the test suite's real servers (redis-server, PostgreSQL) and settings."""

from tests.conftest import (  # noqa: F401  (fixtures, found by name)
    database_url,
    pg_url,
    postgres_server,
    redis,
    redis_server,
)
