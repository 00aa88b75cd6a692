"""Configuration (docs/architecture.md#configuration, docs/operations.md): FLASHTEAM_*
variables, and refusing an unsafe Redis."""

from __future__ import annotations

from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine import ConfigurationError, Engine, Settings
from engine.local.redis_server import RedisClusterServers, RedisServer
from engine.settings import DEFAULTS
from engine.store import unchecked_tls
from testkit.factories import flash_campaign, make_settings

EVERY_VARIABLE = {
    "FLASHTEAM_REDIS_URL": "redis://10.0.0.5:6380/2",
    "FLASHTEAM_REDIS_CLUSTER": "1",
    "FLASHTEAM_DATABASE_URL": "sqlite:////srv/flashteam/orders.db",
    "FLASHTEAM_DATA_DIR": "/srv/flashteam",
    "FLASHTEAM_APPENDFSYNC": "always",
    "FLASHTEAM_RATE_LIMIT": "12",
    "FLASHTEAM_IDEMPOTENCY_TTL": "172800",
    "FLASHTEAM_REAPER_INTERVAL": "0.5",
    "FLASHTEAM_REAPER_BATCH": "250",
}


def test_from_env_reads_every_variable() -> None:
    settings = Settings.from_env(EVERY_VARIABLE)

    assert settings.redis_url == "redis://10.0.0.5:6380/2"
    assert settings.redis_cluster is True
    assert settings.database_url == "sqlite:////srv/flashteam/orders.db"
    assert settings.sqlite_path == Path("/srv/flashteam/orders.db")
    assert settings.data_dir == Path("/srv/flashteam")
    assert settings.appendfsync == "always"
    assert settings.rate_limit == 12
    assert settings.idempotency_ttl == 172_800
    assert settings.reaper_interval == 0.5
    assert settings.reaper_batch == 250


def test_from_env_defaults_are_production_safe() -> None:
    # Unprefixed and empty variables are ignored.
    settings = Settings.from_env({"REDIS_URL": "redis://elsewhere", "FLASHTEAM_RATE_LIMIT": ""})

    assert settings == Settings() == DEFAULTS
    assert settings.redis_url is None
    assert settings.redis_cluster is False
    assert settings.sqlite_path == settings.data_dir / "flashteam.db"
    assert settings.appendfsync in ("everysec", "always")  # never "no": the AOF is fsynced
    assert settings.rate_limit > 0, "rate limiting is on"
    assert settings.idempotency_ttl >= 86_400, "a retry within a day is answered, not re-run"
    assert 0 < settings.reaper_interval <= 1
    assert settings.reaper_batch >= 1
    assert settings.gateway_token is None and settings.admin_token is None
    assert settings.echo_route is False
    assert settings.redis_sentinels is None and settings.sentinel_addresses == []
    assert settings.redis_master == "flashteam"
    # The front door is bounded: a head of 16 KiB, seconds to send it, a cap on connections,
    # a bounded wait on Redis and SQL (docs/http.md#limits-and-timeouts).
    assert settings.max_head <= 16_384 and settings.max_headers <= 100
    assert settings.header_timeout <= 10 and settings.body_timeout <= 10
    assert settings.write_timeout <= 10 and settings.keep_alive <= 5
    assert settings.request_timeout <= 2 and settings.max_connections <= 4_096


def _changed(value: object) -> object:
    """Some valid value other than a field's default."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 if value else 1
    if isinstance(value, Path):
        return Path("/srv/flashteam")
    return {"everysec": "always", "sql": "outbox"}.get(str(value), "changed-value-0123456789")


SENTINEL_ONLY = {
    "redis_sentinels",
    "redis_username",
    "redis_password",
    "redis_sentinel_password",
    "redis_tls",  # the TLS files need TLS on: FLASHTEAM_REDIS_TLS=1 goes with Sentinels
    "redis_tls_ca",
    "redis_tls_cert",
    "redis_tls_key",
}


def test_every_field_is_one_variable_read_and_written() -> None:
    """Each field comes from FLASHTEAM_<NAME>, and to_env gives it back: the launcher hands
    its settings to its processes this way. Sentinel excludes a Redis URL and Cluster, so it
    travels in a second configuration."""
    changed = Settings(
        **{
            each.name: _changed(each.default)  # type: ignore[arg-type]
            for each in fields(Settings)
            if each.name not in SENTINEL_ONLY
        },
    ).with_(database_url="sqlite:////srv/flashteam/orders.db", admin_token="admin-" + "x" * 32)
    via_sentinels = DEFAULTS.with_(
        redis_sentinels="10.0.0.7:26379,10.0.0.8:26379",
        redis_master="orders",
        redis_username="engine",
        redis_password="primary-secret",
        redis_sentinel_password="sentinel-secret",
        redis_tls=True,
        redis_tls_ca="/etc/flashteam/redis-ca.pem",
        redis_tls_cert="/etc/flashteam/engine.pem",
        redis_tls_key="/etc/flashteam/engine.key",
    )
    assert all(
        getattr(changed, each.name) != each.default
        or getattr(via_sentinels, each.name) != each.default
        for each in fields(Settings)
    )

    env = changed.to_env()

    assert set(env) | set(via_sentinels.to_env()) == {
        f"FLASHTEAM_{each.name.upper()}" for each in fields(Settings)
    }
    assert Settings.from_env(env) == changed
    assert Settings.from_env(via_sentinels.to_env()) == via_sentinels
    assert via_sentinels.to_env()["FLASHTEAM_REDIS_SENTINELS"] == "10.0.0.7:26379,10.0.0.8:26379"
    assert Settings.from_env(DEFAULTS.to_env()) == DEFAULTS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"redis_url": "redis://10.0.0.5:6379/0", "redis_tls": True}, "write rediss://"),
        ({"redis_url": "redis://10.0.0.5:6379/0", "redis_tls_ca": "/ca.pem"}, "which is off"),
        ({"redis_sentinels": "10.0.0.5:26379", "redis_tls_ca": "/ca.pem"}, "which is off"),
        (
            {"redis_url": "rediss://10.0.0.5:6379/0", "redis_tls_key": "/engine.key"},
            "FLASHTEAM_REDIS_TLS_CERT, which is unset",
        ),
    ],
)
def test_tls_settings_that_would_be_ignored_are_refused(
    changes: dict[str, object], message: str
) -> None:
    """TLS to Redis is asked for one way per mode (rediss://, or FLASHTEAM_REDIS_TLS=1 with
    Sentinels); a CA or key that TLS would not use is an error at start, not a silent
    plain-text connection."""
    with pytest.raises(ConfigurationError, match=message):
        DEFAULTS.with_(**changes)


def test_tls_is_on_for_a_rediss_url_or_sentinels_with_redis_tls() -> None:
    assert DEFAULTS.with_(redis_url="rediss://10.0.0.5:6379/0").redis_tls_enabled
    assert not DEFAULTS.with_(redis_url="redis://10.0.0.5:6379/0").redis_tls_enabled
    sentinels = DEFAULTS.with_(redis_sentinels="10.0.0.5:26379")
    assert not sentinels.redis_tls_enabled
    assert sentinels.with_(redis_tls=True, redis_tls_ca="/ca.pem").redis_tls_enabled
    assert "(TLS)" in sentinels.with_(redis_tls=True).redis_name


def test_describe_lists_every_variable_with_its_default() -> None:
    table = "\n".join(Settings.describe())

    for each in fields(Settings):
        line = next(entry for entry in Settings.describe() if entry.startswith(_variable(each)))
        if each.default is not None:
            assert f"(default {DEFAULTS.to_env()[_variable(each)]})" in " ".join(line.split())
    assert len(Settings.describe()) == len(fields(Settings))
    assert "FLASHTEAM_RATE_LIMIT" in table


def _variable(each: Field[Any]) -> str:
    return f"FLASHTEAM_{each.name.upper()}"


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHTEAM_REDIS_URL", "redis://127.0.0.1:7000/0")
    monkeypatch.setenv("FLASHTEAM_RATE_LIMIT", "0")

    settings = Settings.from_env()

    assert (settings.redis_url, settings.rate_limit) == ("redis://127.0.0.1:7000/0", 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False)],
)
def test_redis_cluster_flag(value: str, expected: bool) -> None:
    assert Settings.from_env({"FLASHTEAM_REDIS_CLUSTER": value}).redis_cluster is expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RATE_LIMIT", "fast"),
        ("RATE_LIMIT", "2.5"),
        ("RATE_LIMIT", "-1"),
        ("REAPER_INTERVAL", "2"),
        ("REAPER_INTERVAL", "1.01"),
        ("REAPER_INTERVAL", "0"),
        ("REAPER_INTERVAL", "nan"),
        ("REAPER_INTERVAL", "soon"),
        ("IDEMPOTENCY_TTL", "86399"),
        ("IDEMPOTENCY_TTL", "3600"),
        ("IDEMPOTENCY_TTL", "a day"),
        ("APPENDFSYNC", "no"),
        ("APPENDFSYNC", "sometimes"),
        ("REAPER_BATCH", "0"),
        ("REAPER_BATCH", "all"),
        ("REDIS_CLUSTER", "maybe"),
        ("MAX_HEAD", "512"),
        ("MAX_HEADERS", "0"),
        ("MAX_URL", "100"),
        ("MAX_URL", "20000"),  # more than the head it is part of
        ("HEADER_TIMEOUT", "0"),
        ("BODY_TIMEOUT", "nan"),
        ("KEEP_ALIVE", "-1"),
        ("WRITE_TIMEOUT", "forever"),
        ("REQUEST_TIMEOUT", "60"),
        ("MAX_CONNECTIONS", "1"),
        ("ADMISSION_TARGET", "0"),
        ("ADMISSION_MIN", "0"),
        ("ADMISSION_MAX", "8"),  # below the minimum
    ],
)
def test_from_env_rejects_a_bad_value_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({**EVERY_VARIABLE, f"FLASHTEAM_{variable}": value})

    assert f"FLASHTEAM_{variable}" in str(caught.value)
    assert caught.value.code == "configuration_error"


async def _refused(settings: Settings) -> ConfigurationError:
    """Engine.open's ConfigurationError; fails (closing the engine) if it opened instead."""
    try:
        opened = await Engine.open(settings)
    except ConfigurationError as exc:
        return exc
    await opened.close()
    pytest.fail("Engine.open accepted an unsafe configuration")


async def test_settings_from_env_open_a_working_engine(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {
        "FLASHTEAM_REDIS_URL": redis_server.url,
        "FLASHTEAM_DATA_DIR": str(tmp_path / "data"),
        "FLASHTEAM_RATE_LIMIT": "0",
    }
    async with await Engine.open(Settings.from_env(env)) as engine:
        await engine.campaigns.create(flash_campaign(await engine.runtime.now()))
        held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
        assert held.order.user_id == "u1"
    assert (tmp_path / "data" / "flashteam.db").is_file()


async def test_open_without_a_redis_url_is_refused(tmp_path: Path) -> None:
    refused = await _refused(Settings(data_dir=tmp_path))

    assert "FLASHTEAM_REDIS_URL" in str(refused)


async def test_open_refuses_an_evicting_redis(tmp_path: Path) -> None:
    evicting = RedisServer(tmp_path / "lru", extra_args=("--maxmemory-policy", "allkeys-lru"))
    with evicting as server:
        message = str(await _refused(make_settings(server.url, tmp_path)))
        assert "allkeys-lru" in message
        assert "maxmemory-policy noeviction" in message, "the message must say how to fix it"

        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.dbsize() == 0, "a refused start wrote to Redis"
            for policy in ("volatile-lru", "allkeys-random", "volatile-ttl"):
                await client.config_set("maxmemory-policy", policy)
                refused = await _refused(make_settings(server.url, tmp_path))
                assert policy in str(refused) and "noeviction" in str(refused)
            # Following the advice in the message makes the engine start.
            await client.config_set("maxmemory-policy", "noeviction")
            async with await Engine.open(make_settings(server.url, tmp_path)) as engine:
                assert await engine.runtime.now()
        finally:
            await client.aclose()


async def test_open_refuses_a_cluster_with_one_evicting_primary(
    redis_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    node = aioredis.Redis.from_url(redis_cluster.servers[-1].url)
    try:
        await node.config_set("maxmemory-policy", "allkeys-lru")
        settings = make_settings(redis_cluster.url, tmp_path, redis_cluster=True)
        refused = await _refused(settings)
        assert "allkeys-lru" in str(refused) and "noeviction" in str(refused)
    finally:
        await node.config_set("maxmemory-policy", "noeviction")
        await node.aclose()


STRONG = "k" * 16 + "0123456789abcdef"  # 32 characters
WEAK = [
    "short-token-0123456789",  # 22 characters
    "a" * 40,  # one character repeated
    f"{STRONG},",  # an empty second token
]


@pytest.mark.parametrize("weak", WEAK)
def test_a_weak_token_is_refused_at_start(weak: str) -> None:
    """Each role's tokens are 32+ characters, not one repeated; the message never quotes
    the token."""
    for role in ("gateway_token", "admin_token"):
        other = "admin_token" if role == "gateway_token" else "gateway_token"
        settings = DEFAULTS.with_(**{role: weak, other: STRONG[::-1]})
        with pytest.raises(ConfigurationError) as refused:
            settings.require_tokens()
        assert f"FLASHTEAM_{role.upper()}" in refused.value.message
        assert weak.split(",")[0] not in refused.value.message


def test_each_role_takes_a_list_of_tokens() -> None:
    """The current and the next token of each role (a rolling rotation); a token given to
    both roles is refused."""
    gateway = f"{STRONG}, {STRONG[::-1]}"
    admin = "admin-" + STRONG
    assert DEFAULTS.with_(gateway_token=gateway, admin_token=admin).require_tokens() == (
        (STRONG, STRONG[::-1]),
        (admin,),
    )
    shared = DEFAULTS.with_(gateway_token=gateway, admin_token=f"{admin},{STRONG}")
    with pytest.raises(ConfigurationError, match="must differ"):
        shared.require_tokens()


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("postgresql://u:pw@db.example.com:5432/shop", True),
        ("postgresql://u:pw@10.0.0.5/shop?application_name=x", True),
        ("postgresql://u:pw@db.example.com/shop?sslmode=verify-full", False),
        ("postgresql://u:pw@db.example.com/shop?sslmode=disable", False),
        ("postgresql://u@127.0.0.1:5432/shop", False),
        ("postgresql://u@localhost/shop", False),
        ("postgresql://u@[::1]/shop", False),
    ],
)
def test_a_remote_postgresql_url_without_sslmode_is_flagged(url: str, warned: bool) -> None:
    """The start-up warning's condition: TLS that checks no certificate, off loopback."""
    assert unchecked_tls(url) is warned
