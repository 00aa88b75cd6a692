"""Real servers for the suite: a redis-server, a 3-master Redis Cluster and a PostgreSQL
cluster on free loopback ports in temp dirs, started once per session; every test gets a
flushed Redis database and, when it asks for one, a fresh PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine import Campaign, CampaignKind, Engine, Item, Settings
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisClusterServers, RedisServer
from tests.apiserver import ApiServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


async def create_database(server: PostgresServer) -> str:
    """A new, empty database on the server; returns its name."""
    name = f"t_{uuid.uuid4().hex}"
    conn: Any = await asyncpg.connect(server.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on the session's PostgreSQL (not dropped: the whole cluster
    goes at the end of the session, and a DROP DATABASE costs a checkpoint)."""
    yield postgres_server.url_for(await create_database(postgres_server))
    if not postgres_server.running:  # a test left PostgreSQL stopped
        postgres_server.start()


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


def make_settings(url: str, tmp_path: Path, **changes: object) -> Settings:
    """Test settings: a private SQLite file, no rate limit and no sold-out fast path (it
    answers sold_out for a moment after a sell-out: exact per-request outcomes are what most
    tests check) unless a test asks for them."""
    settings = Settings(
        redis_url=url, data_dir=tmp_path, rate_limit=0, reaper_interval=0.05, sold_out_ttl=0
    )
    return settings.with_(**changes) if changes else settings


@pytest.fixture
async def engine(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Engine]:
    async with await Engine.open(make_settings(redis_server.url, tmp_path)) as opened:
        yield opened


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


def flash_campaign(
    now: datetime,
    campaign_id: str = "sale",
    *,
    stock: int = 100,
    limit: int = 2,
    hold_seconds: int = 60,
    starts_in: float = -1.0,
    lasts: float = 3600.0,
    skus: tuple[str, ...] = ("sku-1",),
    price: int = 1999,
) -> Campaign:
    """A flash campaign relative to ``now`` (the Redis clock); active by default."""
    starts = now + timedelta(seconds=starts_in)
    return Campaign(
        id=campaign_id,
        kind=CampaignKind.FLASH,
        title=f"Flash sale {campaign_id}",
        starts_at=starts,
        ends_at=starts + timedelta(seconds=lasts),
        items=tuple(Item(sku, price, stock) for sku in skus),
        per_user_limit=limit,
        hold_seconds=hold_seconds,
    )


def team_campaign(
    now: datetime,
    campaign_id: str = "group",
    *,
    stock: int = 100,
    limit: int = 2,
    team_size: int = 3,
    hold_seconds: int = 60,
    team_ttl_seconds: int = 600,
    starts_in: float = -1.0,
    lasts: float = 3600.0,
    skus: tuple[str, ...] = ("sku-1",),
    price: int = 990,
) -> Campaign:
    """A team campaign relative to ``now`` (the Redis clock); active by default."""
    starts = now + timedelta(seconds=starts_in)
    return Campaign(
        id=campaign_id,
        kind=CampaignKind.TEAM,
        title=f"Team deal {campaign_id}",
        starts_at=starts,
        ends_at=starts + timedelta(seconds=lasts),
        items=tuple(Item(sku, price, stock) for sku in skus),
        per_user_limit=limit,
        hold_seconds=hold_seconds,
        team_size=team_size,
        team_ttl_seconds=team_ttl_seconds,
    )
