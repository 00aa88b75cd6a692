"""The suite's own fixtures; the real servers and the engine come from ``testkit.fixtures``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisServer


@pytest.fixture(scope="session")
def api_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The HTTP tests' own redis-server: the other tests flush theirs at will."""
    with RedisServer(tmp_path_factory.mktemp("api-redis")) as server:
        yield server


@pytest.fixture(scope="session")
def api(api_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """`flashteam serve --workers 2` for the session; tests use their own campaign ids."""
    with ApiServer(api_redis.url, tmp_path_factory.mktemp("api")) as server:
        yield server
