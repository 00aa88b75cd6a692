"""The Redis client the engine runs on: one server, the primary that Redis Sentinel points
at, or a Redis Cluster; and the check that Redis may never evict a key.

After a failover the same client reaches the new primary, without a restart:

- Sentinel: the connection pool asks the Sentinels for the current primary each time it opens
  a connection. A connection to a dead primary fails (ConnectionError) and one to a demoted
  primary answers READONLY, which redis-py turns into a ConnectionError after dropping the
  connection; the retry then reconnects, to wherever the Sentinels now point.
- Cluster: a ConnectionError or CLUSTERDOWN makes the client reload the slot map from a live
  node before its next attempt, and MOVED patches it; once the replica is promoted, its
  slots map to it.

Calls made while no primary is known (the seconds before the promotion) fail with
Unavailable, as for a Redis that is down.

TLS: a ``rediss://`` URL, or ``FLASHTEAM_REDIS_TLS=1`` with Sentinels (then both the Sentinels
and the servers they name are reached over TLS). The server's certificate must chain to
``FLASHTEAM_REDIS_TLS_CA`` (else to the system's trusted CAs) and name the host connected to;
``FLASHTEAM_REDIS_TLS_CERT`` and ``FLASHTEAM_REDIS_TLS_KEY`` are the client's own, for servers
that ask for one (``tls-auth-clients yes``, Redis's default).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from engine.errors import ConfigurationError, Unavailable
from engine.scripts import RedisClient, guarded
from engine.settings import Settings

MAX_IN_FLIGHT = 256
# A Sentinel that does not answer within this is skipped for the next one of the list.
_SENTINEL_TIMEOUT = 1.0
# The errors after which a call is sent again on a new connection.
_RETRY_ON = [redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError]


def connect_redis(settings: Settings) -> RedisClient:
    """A client for ``settings.redis_url``: a cluster client when ``redis_cluster`` (the URL
    may then be a comma-separated list of seeds); with
    ``redis_sentinels``, a client of the primary the Sentinels name for ``redis_master``."""
    if settings.redis_sentinels is not None:
        return _sentinel_client(settings)
    if settings.redis_url is None:
        raise ConfigurationError(
            "FLASHTEAM_REDIS_URL is not set: use `flashteam run`, which starts a private "
            "redis-server, or point FLASHTEAM_REDIS_URL at your Redis (or "
            "FLASHTEAM_REDIS_SENTINELS at your Sentinels)"
        )
    tls = tls_options(settings)
    if settings.redis_cluster:
        # Per node; scripts are capped at MAX_IN_FLIGHT by Scripts, other calls share the rest.
        # The retry counts whole attempts, each after reloading the slot map when the last
        # one failed on a connection (a dead primary) or met CLUSTERDOWN (mid-failover).
        # Every seed of the list is tried at start-up until one answers; the first URL's
        # credentials and options apply to all.
        first, *more = settings.redis_url.split(",")
        seeds = [ClusterNode(*_host_port(url)) for url in more]
        return RedisCluster.from_url(
            first.strip(),
            startup_nodes=seeds or None,
            decode_responses=True,
            max_connections=MAX_IN_FLIGHT * 4,
            retry=_retry(),
            **tls,
        )
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        max_connections=MAX_IN_FLIGHT * 2,
        retry=_retry(),
        retry_on_error=_RETRY_ON,
        **tls,
    )


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS arguments for ``settings`` (empty without TLS): the certificate is
    always verified, against FLASHTEAM_REDIS_TLS_CA when set, and must name the host. A file
    that cannot be read is a ConfigurationError naming its variable, at start-up."""
    if not settings.redis_tls_enabled:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    for name, option in (
        ("redis_tls_ca", "ssl_ca_certs"),
        ("redis_tls_cert", "ssl_certfile"),
        ("redis_tls_key", "ssl_keyfile"),
    ):
        path = getattr(settings, name)
        if path is None:
            continue
        if not os.access(path, os.R_OK) or os.path.isdir(path):
            raise ConfigurationError(
                f"FLASHTEAM_{name.upper()}={path}: no such file, or not readable by this user"
            )
        options[option] = path
    return options


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlsplit(url.strip())
    return parsed.hostname or "localhost", parsed.port or 6379


class SentinelPrimary(aioredis.Redis):
    """A client of the primary that Redis Sentinel names (``Sentinel.master_for``): an
    ``aioredis.Redis`` like any other, whose closing also closes its connections to the
    Sentinels."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the Sentinels' primary that asks them again whenever it reconnects.

    redis-py's own asks only when the pool hands the connection out (``connect``); the retry
    inside a call reconnects through ``send_packed_command``, which would go back to the same,
    demoted, server: the call would fail three times on READONLY. Reconnecting through
    ``connect`` here makes the retry reach the new primary."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.is_connected:
            await SentinelManagedConnection.connect(self)
        await super().send_packed_command(command, check_health)


class _PrimaryTLSConnection(_PrimaryConnection, SSLConnection):
    """``_PrimaryConnection`` over TLS (FLASHTEAM_REDIS_TLS=1)."""


def _sentinel_client(settings: Settings) -> SentinelPrimary:
    """The primary of ``settings.redis_master``, found through ``settings.redis_sentinels``
    (with ``redis_sentinel_password``, theirs) when each connection opens, logged in with
    ``redis_username`` and ``redis_password`` when set; with ``redis_tls``, both the Sentinels
    and the primary over TLS, with the same CA and client certificate. A missing or
    unreachable set of Sentinels surfaces on the first call (Unavailable), as a down Redis
    does."""
    tls = tls_options(settings)
    # The Sentinels' clients are plain redis-py clients: ssl=True makes their connections TLS.
    sentinel_tls = {"ssl": True, **tls} if tls else {}
    sentinel = Sentinel(
        settings.sentinel_addresses,
        # One try per Sentinel and call: the next Sentinel of the list is the retry (redis-py's
        # default would retry each one three times, backing off up to 10 s).
        sentinel_kwargs={
            "socket_timeout": _SENTINEL_TIMEOUT,
            "socket_connect_timeout": _SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "password": settings.redis_sentinel_password,
            **sentinel_tls,
        },
    )
    client: SentinelPrimary = sentinel.master_for(
        settings.redis_master,
        redis_class=SentinelPrimary,
        connection_class=_PrimaryTLSConnection if tls else _PrimaryConnection,
        username=settings.redis_username,
        password=settings.redis_password,
        decode_responses=True,
        max_connections=MAX_IN_FLIGHT * 2,
        retry=_retry(),
        retry_on_error=_RETRY_ON,
        **tls,
    )
    client.sentinels = sentinel
    return client


def _retry() -> Retry:
    """Two quick retries on a broken connection: a pooled connection that went stale across a
    Redis restart or a failover is replaced instead of failing the call. Safe because every
    script may run twice: reserve and joins replay through their idempotency key, pay with the
    same reference is a no-op, cancel/refund/expire/invalidate answer OK when already done."""
    return Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), 2)


async def check_eviction_policy(client: RedisClient) -> None:
    """Refuse a Redis that may evict keys: an evicted stock key is an oversell
    (docs/operations.md)."""
    try:
        await _check_eviction_policy(client)
    except Unavailable as exc:
        refused = _certificate_refused(exc)
        if refused is None:
            raise
        raise ConfigurationError(
            f"Redis's TLS certificate was refused: {refused}. The server's certificate must be "
            "signed by a CA of FLASHTEAM_REDIS_TLS_CA (or, when it is unset, one the system "
            "trusts) and name the host in the URL or the Sentinels' answer "
            "(docs/operations.md#tls-to-redis)"
        ) from None


def _certificate_refused(exc: BaseException) -> str | None:
    """What TLS said when it refused the server's certificate, when that is why ``exc``
    happened; None for any other failure (a Redis that is down stays Unavailable)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason)
        seen = seen.__cause__ or seen.__context__
    return "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else None


async def _check_eviction_policy(client: RedisClient) -> None:
    if isinstance(client, RedisCluster):
        await guarded(client.initialize())
        primaries = client.get_primaries()
        if not primaries:
            raise Unavailable("the Redis Cluster reports no primaries", service="redis")
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
