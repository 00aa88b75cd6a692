"""Real servers for the suite and the benchmarks (a pytest plugin, ``-p testkit.fixtures``): a
redis-server, a 3-master Redis Cluster and a PostgreSQL cluster on free loopback ports in temp
dirs, started once per session; every test gets a flushed Redis database and, when it asks
for one, a fresh PostgreSQL database; ``any_engine`` runs a test on the standalone Redis and
then on the cluster.

For failover tests, ``sentinel_redis`` (a primary, its replica and three Sentinels) and
``replicated_cluster`` (three masters, each with a replica) are started fresh for each test
that asks, since such a test kills a primary; each takes about two seconds to start.
``sentinel_settings`` builds the engine's settings for the first."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis

from engine import Engine, Settings
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisClusterServers, RedisSentinelGroup, RedisServer
from testkit.factories import create_database, make_settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[RedisSentinelGroup]:
    """A fresh primary, replica and three Sentinels (quorum 2, a primary is down after 1 s of
    silence), all agreed on the primary: a test may kill it."""
    with RedisSentinelGroup(tmp_path / "sentinel") as group:
        yield group


def sentinel_settings(group: RedisSentinelGroup, tmp_path: Path, **changes: object) -> Settings:
    """``make_settings`` for an engine that finds its Redis through the group's Sentinels
    (FLASHTEAM_REDIS_SENTINELS and FLASHTEAM_REDIS_MASTER, no FLASHTEAM_REDIS_URL), with the
    group's passwords, and over TLS when the group uses it (its CA, and its certificate as the
    client's when the servers ask for one)."""
    sentinels: dict[str, object] = {
        "redis_url": None,
        "redis_sentinels": group.addresses,
        "redis_master": group.master,
        "redis_password": group.password,
        "redis_sentinel_password": group.sentinel_password,
    }
    if group.tls is not None:
        sentinels |= {"redis_tls": True, "redis_tls_ca": str(group.tls.ca)}
        if group.tls.auth_clients:
            sentinels |= {
                "redis_tls_cert": str(group.tls.cert),
                "redis_tls_key": str(group.tls.key),
            }
    return make_settings("", tmp_path).with_(**(sentinels | changes))


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A fresh Redis Cluster of three masters, each with one replica in sync, and a
    cluster-node-timeout of 1 s: a master killed is replaced by its replica within seconds."""
    with RedisClusterServers(tmp_path / "cluster", replicas=1, node_timeout_ms=1000) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on the session's PostgreSQL (not dropped: the whole cluster
    goes at the end of the session, and a DROP DATABASE costs a checkpoint)."""
    yield postgres_server.url_for(await create_database(postgres_server))
    if not postgres_server.running:  # a test left PostgreSQL stopped
        postgres_server.start()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each durable backend in turn: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flashteam.db'}"
    return cast(str, request.getfixturevalue("pg_url"))


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on the session server, with every key and script flushed first."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()


@pytest.fixture
async def engine(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Engine]:
    async with await Engine.open(make_settings(redis_server.url, tmp_path)) as opened:
        yield opened


@pytest.fixture(
    params=[
        pytest.param("engine", id="standalone"),
        pytest.param("cluster_engine", id="cluster", marks=pytest.mark.cluster),
    ]
)
def any_engine(request: pytest.FixtureRequest) -> Engine:
    """The engine on the standalone redis-server, then the one on the Redis Cluster."""
    return cast(Engine, request.getfixturevalue(request.param))


@pytest.fixture
async def cluster_engine(
    redis_cluster: RedisClusterServers, tmp_path: Path
) -> AsyncIterator[Engine]:
    for server in redis_cluster.servers:
        client = aioredis.Redis.from_url(server.url)
        await client.flushall()
        await client.aclose()
    settings = make_settings(redis_cluster.url, tmp_path, redis_cluster=True)
    async with await Engine.open(settings) as opened:
        yield opened
