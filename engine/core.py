"""The engine: one object that the CLI, the HTTP layer, benchmarks and tests all use.

async with await Engine.open(settings) as engine:
    view = await engine.campaigns.create(campaign)
    held = await engine.flash.reserve("c1", "u1", "sku-1", 1, "key-1")
    await engine.orders.pay(held.order.order_id, "u1", "pay-1")
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from engine.campaigns import Campaigns
from engine.coalesce import Coalescer
from engine.errors import ConfigurationError, EngineError, Unavailable
from engine.flash import FlashSale
from engine.orders import Orders
from engine.reaper import Reaper
from engine.runtime import Runtime
from engine.scripts import OrderArgs, RedisClient, Scripts, guarded
from engine.settings import Settings
from engine.store import Store, open_store
from engine.teams import Teams

_MAX_IN_FLIGHT = 256


def connect_redis(settings: Settings) -> RedisClient:
    """A client for ``settings.redis_url`` (a cluster client when ``redis_cluster``)."""
    if settings.redis_url is None:
        raise ConfigurationError(
            "FLASHTEAM_REDIS_URL is not set: use `flashteam run`, which starts a private "
            "redis-server, or point FLASHTEAM_REDIS_URL at your Redis"
        )
    if settings.redis_cluster:
        # Per node; scripts are capped at _MAX_IN_FLIGHT by Scripts, other calls share the rest.
        return RedisCluster.from_url(
            settings.redis_url,
            decode_responses=True,
            max_connections=_MAX_IN_FLIGHT * 4,
            retry=_retry(),
        )
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        max_connections=_MAX_IN_FLIGHT * 2,
        retry=_retry(),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
    )


def _retry() -> Retry:
    """Two quick retries on a broken connection: a pooled connection that went stale across a
    Redis restart is replaced instead of failing the call. Safe because every script may run
    twice: reserve and joins replay through their idempotency key, pay with the same reference
    is a no-op, cancel/refund/expire/invalidate answer OK when already done."""
    return Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), 2)


async def check_eviction_policy(client: RedisClient) -> None:
    """Refuse a Redis that may evict keys: an evicted stock key is an oversell
    (docs/operations.md)."""
    if isinstance(client, RedisCluster):
        await guarded(client.initialize())
        primaries = client.get_primaries()
        if not primaries:
            raise Unavailable("the Redis Cluster reports no primaries")
        replies: list[Any] = [
            await guarded(client.info("memory", target_nodes=node)) for node in primaries
        ]
    else:
        replies = [await guarded(client.info("memory"))]
    for info in replies:
        policy = info.get("maxmemory_policy")
        if policy != "noeviction":
            raise ConfigurationError(
                f"Redis runs with maxmemory-policy {policy}: flashteam needs noeviction, or "
                "evicted stock keys would oversell. Fix: set `maxmemory-policy noeviction` in "
                "redis.conf (or run `redis-cli CONFIG SET maxmemory-policy noeviction`)."
            )


class Engine:
    """Campaigns, flash sale, teams, orders and the reaper over one Redis and one durable
    store."""

    def __init__(self, rt: Runtime) -> None:
        self.runtime = rt
        self.reaper = Reaper(rt)
        self.campaigns = Campaigns(rt, cascade=self.reaper.expire_campaign)
        self.coalescer = Coalescer(rt)
        self.flash = FlashSale(rt, self.coalescer)
        self.orders = Orders(rt)
        self.teams = Teams(rt, self.coalescer)

    @classmethod
    async def open(cls, settings: Settings, store: Store | None = None) -> Engine:
        """Connect, check Redis, load the scripts, open the store and warm the campaigns."""
        client = connect_redis(settings)
        try:
            await check_eviction_policy(client)
            scripts = Scripts(client, OrderArgs.of(settings), _MAX_IN_FLIGHT)
            await scripts.load()
            store = store or await open_store(settings)
        except BaseException:
            await client.aclose()
            raise
        engine = cls(Runtime(settings, client, scripts, store))
        await engine.campaigns.warm_all()
        return engine

    async def readiness(self) -> dict[str, str]:
        """Each dependency's state, "ok" or what is wrong: Redis, the scripts, the store."""
        rt = self.runtime
        checks: dict[str, str] = {}
        for name, probe in (
            ("redis", rt.now()),
            ("scripts", rt.scripts.load()),
            ("sql", rt.store.get_campaign("readyz-probe")),
        ):
            try:
                await probe
                checks[name] = "ok"
            except EngineError as exc:
                checks[name] = exc.message
        return checks

    async def close(self) -> None:
        """Close the store and the Redis connections."""
        await self.runtime.store.close()
        await self.runtime.redis.aclose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
