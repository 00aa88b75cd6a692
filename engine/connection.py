"""The Redis client the engine runs on: one server, or a Redis Cluster; and the check that
Redis may never evict a key."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from engine.errors import ConfigurationError, Unavailable
from engine.scripts import RedisClient, guarded
from engine.settings import Settings

MAX_IN_FLIGHT = 256


def connect_redis(settings: Settings) -> RedisClient:
    """A client for ``settings.redis_url`` (a cluster client when ``redis_cluster``)."""
    if settings.redis_url is None:
        raise ConfigurationError(
            "FLASHTEAM_REDIS_URL is not set: use `flashteam run`, which starts a private "
            "redis-server, or point FLASHTEAM_REDIS_URL at your Redis"
        )
    if settings.redis_cluster:
        # Per node; scripts are capped at MAX_IN_FLIGHT by Scripts, other calls share the rest.
        return RedisCluster.from_url(
            settings.redis_url,
            decode_responses=True,
            max_connections=MAX_IN_FLIGHT * 4,
            retry=_retry(),
        )
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        max_connections=MAX_IN_FLIGHT * 2,
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
