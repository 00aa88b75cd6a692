"""The settings every process must share (docs/operations.md#what-must-match): a process
started with another value of one of them warns, naming it; tokens are compared as digests
only, and only between processes that have them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine import Engine
from engine.fingerprint import SETTINGS_KEY
from engine.local.redis_server import RedisServer
from testkit.factories import make_settings

TOKEN = "gateway-token-0123456789"


async def test_a_process_with_other_shared_settings_names_them(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = make_settings(redis_server.url, tmp_path, gateway_token=TOKEN)
    async with await Engine.open(base):
        pass
    assert TOKEN not in str(await redis.hgetall(SETTINGS_KEY))  # a digest, not the secret

    caplog.set_level(logging.WARNING, "engine.fingerprint")
    worker = base.with_(gateway_token=None)  # a flush worker has no token: nothing to compare
    async with await Engine.open(worker):
        pass
    async with await Engine.open(base):
        pass
    assert not [r for r in caplog.records if r.name == "engine.fingerprint"]

    drifted = base.with_(rate_limit=9, pay_durability="outbox", gateway_token=TOKEN + "x")
    async with await Engine.open(drifted):
        pass
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "engine.fingerprint"]
    assert warning.startswith(
        "FLASHTEAM_GATEWAY_TOKEN, FLASHTEAM_PAY_DURABILITY, FLASHTEAM_RATE_LIMIT differ from"
    ), warning
    assert "FLASHTEAM_ADMIN_TOKEN" not in warning and "IDEMPOTENCY" not in warning
