"""How the engine reaches Redis (engine/connection.py, docs/operations.md): through Redis
Sentinel or a Redis Cluster with replicas, the same client follows a failover without a
restart; a bad Sentinel configuration is refused with a message naming the variable.

Real servers: a primary, its replica and three Sentinels, or a 3+3 Redis Cluster; the
primary is SIGKILLed and its replica promoted (a few seconds each)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot

from engine import ConfigurationError, Engine, Settings
from engine.api.metrics import dependencies
from engine.connection import SentinelPrimary, check_eviction_policy, connect_redis
from engine.errors import Unavailable
from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN, LocalEngine
from engine.local.process import free_port
from engine.local.redis_server import RedisClusterServers, RedisSentinelGroup, RedisServer
from engine.recovery import RECOVERY_STATS
from engine.worker import FlushWorker
from testkit.certificates import make_certificates
from testkit.factories import flash_campaign, make_settings
from testkit.fixtures import sentinel_settings
from testkit.helpers import eventually, run_cli
from tests.test_api_load import SKU, create_campaign, http, stock_of

# A failover here takes 2-3 s (down after 1 s, then the vote and the promotion).
FAILOVER_BOUND = 15.0

_T = TypeVar("_T")


async def _port_of(client: aioredis.Redis) -> int:
    """The port of the server the client's call reaches (INFO server)."""
    return int((await client.info("server"))["tcp_port"])


async def _until_it_works(
    call: Callable[[], Awaitable[_T]],
) -> tuple[_T, list[type[BaseException]], float]:
    """Retry ``call()`` until it succeeds within FAILOVER_BOUND seconds; returns its result,
    the Redis errors met on the way and the seconds it took."""
    errors: list[type[BaseException]] = []
    started = time.monotonic()
    while True:
        try:
            return await call(), errors, time.monotonic() - started
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            errors.append(type(exc))
            if time.monotonic() - started > FAILOVER_BOUND:
                raise
            await asyncio.sleep(0.1)


async def test_sentinel_client_follows_a_promotion_without_a_restart(
    sentinel_redis: RedisSentinelGroup, tmp_path: Path
) -> None:
    client = connect_redis(sentinel_settings(sentinel_redis, tmp_path))
    try:
        assert isinstance(client, SentinelPrimary) and isinstance(client, aioredis.Redis)
        await check_eviction_policy(client)
        old = sentinel_redis.primary_port
        assert await _port_of(client) == old
        await client.set("k", "before")
        assert await client.wait(1, 5000) == 1, "the replica has the write"

        sentinel_redis.kill_primary()
        _, errors, took = await _until_it_works(lambda: client.set("k", "after"))

        promoted = sentinel_redis.wait_promoted()
        assert promoted != old
        assert errors, "the first write after the kill met the dead primary"
        assert all(issubclass(each, redis_errors.ConnectionError) for each in errors), errors
        assert took < FAILOVER_BOUND
        assert await _port_of(client) == promoted
        assert await client.get("k") == "after"
        assert sentinel_redis.primary.role() == "master"
    finally:
        await client.aclose()


async def test_sentinel_client_leaves_a_demoted_primary(
    sentinel_redis: RedisSentinelGroup, tmp_path: Path
) -> None:
    """A graceful failover turns the old primary into a replica: it is alive and answers
    READONLY to a write on a pooled connection; that call reconnects to the new primary and
    succeeds, with no error reaching the caller."""
    client = connect_redis(sentinel_settings(sentinel_redis, tmp_path))
    sentinel = aioredis.Redis(port=sentinel_redis.sentinels[0].port, decode_responses=True)
    old = aioredis.Redis(port=sentinel_redis.primary_port, decode_responses=True)
    try:
        assert isinstance(client, SentinelPrimary)
        await client.set("k", "before")  # leaves one pooled connection to the old primary
        assert await sentinel.sentinel_failover(sentinel_redis.master)
        promoted = sentinel_redis.wait_promoted()
        # The Sentinels demote the old primary once they see it still claims to be one, at
        # their next INFO (every 10 s); the test does the same at once.
        await old.replicaof("127.0.0.1", promoted)
        assert (await old.info("replication"))["role"] == "slave"

        assert await client.set("k", "after")  # one call, no retry loop
        assert await _port_of(client) == promoted
        assert await client.get("k") == "after"
    finally:
        await old.aclose()
        await sentinel.aclose()
        await client.aclose()


async def test_engine_opens_through_the_sentinels(
    sentinel_redis: RedisSentinelGroup, tmp_path: Path
) -> None:
    async with await Engine.open(sentinel_settings(sentinel_redis, tmp_path)) as engine:
        assert isinstance(engine.runtime.redis, SentinelPrimary)
        await engine.campaigns.create(flash_campaign(await engine.runtime.now()))
        held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
        assert held.order.user_id == "u1"
    primary = aioredis.Redis(port=sentinel_redis.primary_port)
    try:
        assert await primary.dbsize() > 0, "the engine wrote to the primary"
    finally:
        await primary.aclose()


def _served_by(client: RedisCluster, key: str) -> int:
    """The port of the node the cluster client sends ``key``'s commands to now."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def _key_on(cluster: RedisClusterServers, node: int) -> str:
    """A key whose slot master ``node`` serves (the slots are split evenly in order)."""
    share = 16384 // cluster.masters
    return next(
        key
        for key in (f"failover-{i}" for i in range(100_000))
        if node * share <= key_slot(key.encode()) < (node + 1) * share
    )


async def test_cluster_client_follows_a_replica_promotion(
    replicated_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    settings = make_settings(replicated_cluster.url, tmp_path, redis_cluster=True)
    client = connect_redis(settings)
    key = _key_on(replicated_cluster, 0)
    killed = replicated_cluster.servers[0]
    replica = aioredis.Redis(port=replicated_cluster.servers[replicated_cluster.masters].port)
    try:
        assert isinstance(client, RedisCluster)
        await check_eviction_policy(client)
        await client.set(key, "before")
        assert _served_by(client, key) == killed.port
        deadline = time.monotonic() + FAILOVER_BOUND
        while await replica.dbsize() < 1:  # the replica has the write
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

        replicated_cluster.kill_master(0)
        value, errors, took = await _until_it_works(lambda: client.get(key))
        assert (await _until_it_works(lambda: client.set(key, "after")))[0]

        promoted = replicated_cluster.wait_promoted(killed)
        assert value == "before", "the promoted replica serves the write made before"
        assert errors, "the first call after the kill met the dead master"
        assert took < FAILOVER_BOUND
        assert _served_by(client, key) == promoted.port != killed.port
        assert await client.get(key) == "after"
        # The other masters' keys were never in doubt, and the eviction check sees the new set.
        assert await client.set(_key_on(replicated_cluster, 1), "x")
        await check_eviction_policy(client)
        assert {node.port for node in client.get_primaries()} == {
            each.port for each in replicated_cluster.primaries()
        }
    finally:
        await replica.aclose()
        await client.aclose()


@pytest.mark.parametrize(
    "sentinels",
    [
        "10.0.0.1",
        "10.0.0.1:",
        ":26379",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:26379,,10.0.0.2:26379",
        "10.0.0.1:sentinel",
        "redis://10.0.0.1:26379",
        "10.0.0.1 :26379",
        "10.0.0.1:26379,10.0.0.1:26379",
    ],
)
def test_a_bad_sentinel_list_is_refused_naming_the_variable(sentinels: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"FLASHTEAM_REDIS_SENTINELS": sentinels})

    assert "FLASHTEAM_REDIS_SENTINELS" in str(caught.value)
    assert caught.value.code == "configuration_error"


def test_a_sentinel_list_is_read_in_order() -> None:
    settings = Settings.from_env(
        {"FLASHTEAM_REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380,[::1]:26381"}
    )

    assert settings.sentinel_addresses == [
        ("10.0.0.1", 26379),
        ("sentinel-b", 26380),
        ("::1", 26381),
    ]
    assert settings.redis_master == "flashteam"
    assert Settings().sentinel_addresses == []


@pytest.mark.parametrize(
    ("also", "named"),
    [
        ({"FLASHTEAM_REDIS_URL": "redis://10.0.0.5:6379/0"}, "FLASHTEAM_REDIS_URL"),
        ({"FLASHTEAM_REDIS_CLUSTER": "1"}, "FLASHTEAM_REDIS_CLUSTER"),
        ({"FLASHTEAM_REDIS_MASTER": "my master"}, "FLASHTEAM_REDIS_MASTER"),
    ],
)
def test_sentinels_with_a_conflicting_setting_are_refused(also: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"FLASHTEAM_REDIS_SENTINELS": "10.0.0.1:26379", **also})

    assert named in str(caught.value) and "FLASHTEAM_REDIS_SENTINELS" in str(caught.value)


async def test_unreachable_sentinels_make_the_engine_unavailable(tmp_path: Path) -> None:
    settings = make_settings("", tmp_path).with_(
        redis_url=None, redis_sentinels=f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    )
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await Engine.open(settings)

    assert "flashteam" in str(caught.value), "the message names the master looked for"
    assert time.monotonic() - started < 5


async def test_an_unknown_master_name_makes_the_engine_unavailable(
    sentinel_redis: RedisSentinelGroup, tmp_path: Path
) -> None:
    settings = sentinel_settings(sentinel_redis, tmp_path, redis_master="orders")
    with pytest.raises(Unavailable) as caught:
        await Engine.open(settings)

    assert "orders" in str(caught.value)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_sale_then_a_failover_through_sentinels_with_passwords(
    tmp_path: Path, tls: bool
) -> None:
    """Sentinels and servers that require passwords (requirepass on both), and, with ``tls``,
    listen for TLS only (the Sentinels, the primary and its replica: FLASHTEAM_REDIS_TLS=1 and
    the CA in FLASHTEAM_REDIS_TLS_CA): a client without the passwords is refused; the engine,
    given them, sells, keeps selling through a failover (the promoted replica checked against
    SQL: verified, or repaired where it lagged) and keeps what was paid."""
    certificates = make_certificates(tmp_path / "tls") if tls else None
    with RedisSentinelGroup(
        tmp_path / "group",
        password="primary-" + "p" * 24,
        sentinel_password="sentinel-" + "s" * 24,
        tls=certificates,
    ) as group:
        # Over TLS, the anonymous client verifies the servers: only the password is missing.
        ca = None if certificates is None else str(certificates.ca)
        for port in (group.primary_port, group.sentinels[0].port):
            anonymous = aioredis.Redis(host="127.0.0.1", port=port, ssl=tls, ssl_ca_certs=ca)
            try:
                with pytest.raises(redis_errors.AuthenticationError):
                    await anonymous.ping()
            finally:
                await anonymous.aclose()
        async with await Engine.open(sentinel_settings(group, tmp_path)) as engine:
            await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=10))
            held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
            await engine.orders.pay(held.order.order_id, "u1", "psp-1")  # committed to SQL
            old = group.primary_port
            group.kill_primary()
            assert await asyncio.to_thread(group.wait_promoted) != old

            started = time.monotonic()
            while True:  # 503s while there is no primary, or while a lagging one is repaired
                try:
                    await engine.flash.reserve("sale", "u2", "sku-1", 1, "k2")
                    break
                except Unavailable:
                    assert time.monotonic() - started < FAILOVER_BOUND
                    await asyncio.sleep(0.1)
            assert (await engine.orders.get(held.order.order_id)).payment_ref == "psp-1"
            stats = await engine.runtime.redis.hgetall(RECOVERY_STATS)
            checked = int(stats.get("verified", 0)) + engine.recovery.repairs
            assert checked >= 1, "the promoted replica was checked against SQL"
            if tls:  # the same client still speaks TLS, to the promoted replica
                primary = engine.runtime.redis
                assert isinstance(primary, SentinelPrimary)
                connection = await primary.connection_pool.get_connection()
                try:
                    assert isinstance(connection, SSLConnection)
                    assert connection.port == group.primary_port
                finally:
                    await primary.connection_pool.release(connection)


def _ft_env(settings: Settings) -> dict[str, str]:
    """The environment of a `flashteam` command run with ``settings``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTEAM_")}
    return inherited | settings.to_env()


async def test_a_sale_over_tls_to_redis_that_asks_for_a_client_certificate(
    tmp_path: Path,
) -> None:
    """A rediss:// URL with FLASHTEAM_REDIS_TLS_CA, FLASHTEAM_REDIS_TLS_CERT and _KEY, against
    a redis-server that listens for TLS only and asks clients for a certificate (Redis's
    default): a client without one is refused; the engine's processes (API, worker, reaper,
    each handed the settings through the environment) run a sale over HTTP, and `flashteam
    reconcile` finds SQL and Redis equal."""
    certificates = make_certificates(tmp_path / "tls", auth_clients=True)
    with RedisServer(tmp_path / "redis", tls=certificates) as server:
        assert server.url.startswith("rediss://127.0.0.1:")
        no_certificate = aioredis.Redis.from_url(server.url, ssl_ca_certs=str(certificates.ca))
        try:
            with pytest.raises(redis_errors.ConnectionError):
                await no_certificate.ping()
        finally:
            await no_certificate.aclose()
        settings = make_settings(
            server.url,
            tmp_path,
            redis_tls_ca=str(certificates.ca),
            redis_tls_cert=str(certificates.cert),
            redis_tls_key=str(certificates.key),
            gateway_token=TEST_GATEWAY_TOKEN,
            admin_token=TEST_ADMIN_TOKEN,
        )
        gateway = {"authorization": f"Bearer {TEST_GATEWAY_TOKEN}"}
        with LocalEngine(
            settings, port=free_port(), workers=1, log=tmp_path / "engine.log"
        ) as local:
            async with http(local.url) as client:
                await create_campaign(client, "tls-sale", stock=10, limit=2)
                held = await client.post(
                    "/v1/campaigns/tls-sale/orders",
                    json={"user_id": "u1", "sku": SKU, "qty": 2, "idempotency_key": "k1"},
                    headers=gateway,
                )
                assert held.status_code == 201, held.text
                paid = await client.post(
                    f"/v1/orders/{held.json()['order_id']}/pay",
                    json={"user_id": "u1", "payment_ref": "psp-tls-1"},
                    headers=gateway,
                )
                assert (paid.status_code, paid.json()["state"]) == (200, "paid"), paid.text
                stock = await stock_of(client, "tls-sale")
                assert (stock["paid"], stock["available"]) == (2, 8)

            async def reconciled() -> bool:
                code, _, _ = await run_cli("reconcile", "tls-sale", env=local.env())
                return code == 0

            await eventually(reconciled, 30, what="flashteam reconcile to come back clean")


async def test_a_redis_certificate_from_another_ca_is_refused_at_start(tmp_path: Path) -> None:
    """A rediss:// server whose certificate FLASHTEAM_REDIS_TLS_CA did not sign: the engine
    refuses to start, with one line saying why and what to check, not a traceback; the right
    CA opens it."""
    certificates = make_certificates(tmp_path / "tls")
    other = make_certificates(tmp_path / "other")
    with RedisServer(tmp_path / "redis", tls=certificates) as server:
        wrong = make_settings(server.url, tmp_path, redis_tls_ca=str(other.ca))
        with pytest.raises(ConfigurationError, match="certificate was refused"):
            await Engine.open(wrong)
        code, out, err = await run_cli("reconcile", "any", env=_ft_env(wrong))
        assert code == 2, (out, err)
        assert "Traceback" not in err
        assert err.startswith("flashteam: Redis's TLS certificate was refused: ")
        assert "FLASHTEAM_REDIS_TLS_CA" in err
        right = wrong.with_(redis_tls_ca=str(certificates.ca))
        async with await Engine.open(right) as engine:
            assert await engine.runtime.redis.ping()


# The engine's Redis user, as docs/operations.md#redis-acl gives it (the password aside).
ACL_RULES = (
    "on resetkeys ~ft:* resetchannels -@all +@read +@write +@scripting +@connection "
    "+@fast -@dangerous +info"
)


async def test_a_sale_runs_as_the_documented_acl_user(tmp_path: Path) -> None:
    """Every part of the engine (reservations, payments, cancels, refunds, the reaper, the
    flush worker, a repair from SQL, /metrics' reads) works as a Redis user with exactly the
    rules of docs/operations.md; that user cannot FLUSHALL nor touch keys outside ft:."""
    docs = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    assert f"ACL SETUSER flashteam {ACL_RULES} >" in docs
    with RedisServer(tmp_path / "redis") as server:
        admin = aioredis.Redis(port=server.port)
        try:
            await admin.execute_command(
                "ACL", "SETUSER", "flashteam", *ACL_RULES.split(), ">pw-" + "a1" * 16
            )
        finally:
            await admin.aclose()
        url = f"redis://flashteam:pw-{'a1' * 16}@127.0.0.1:{server.port}/0"
        async with await Engine.open(make_settings(url, tmp_path)) as engine:
            now = await engine.runtime.now()
            await engine.campaigns.create(flash_campaign(now, stock=10, hold_seconds=1))
            paid = (await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")).order
            await engine.orders.pay(paid.order_id, "u1", "psp-1")
            cancelled = (await engine.flash.reserve("sale", "u2", "sku-1", 1, "k2")).order
            await engine.orders.cancel(cancelled.order_id, "u2")
            await engine.orders.refund(paid.order_id, True)
            await engine.flash.reserve("sale", "u3", "sku-1", 1, "k3")
            await asyncio.sleep(1.1)
            assert await engine.reaper.run_once() >= 1  # the hold expired
            assert await FlushWorker(engine.runtime).drain() > 0
            await engine.recovery.repair("sale", "manual")
            assert "flashteam_redis_up 1" in await dependencies(engine.runtime, 5.0)
            user = engine.runtime.redis
            with pytest.raises(redis_errors.NoPermissionError):
                await user.flushall()
            with pytest.raises(redis_errors.NoPermissionError):
                await user.set("other:key", "x")
