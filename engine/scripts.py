"""The Lua scripts: loaded once at start-up, called through one translating boundary.

Each ``lua/*.lua`` file is one atomic operation; ``lua/lib/common.lua`` is prepended to each
(EVAL has no module system). redis-py's ``AsyncScript`` does EVALSHA and, on NOSCRIPT (a Redis
restart, failover or SCRIPT FLUSH), loads the script and retries, so recovery needs no step.
Redis errors are translated here, and only here, into engine errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from engine import errors

RedisClient: TypeAlias = aioredis.Redis | RedisCluster


class Code(IntEnum):
    """Outcome codes returned by every script (mirrors lua/lib/common.lua)."""

    OK = 0
    NOT_FOUND = 1
    NOT_STARTED = 2
    ENDED = 3
    INVALIDATED = 4
    SOLD_OUT = 5
    LIMIT_EXCEEDED = 6
    RATE_LIMITED = 7
    IDEMPOTENCY_MISMATCH = 8
    FORBIDDEN = 9
    HOLD_EXPIRED = 10
    INVALID_STATE = 11
    NOT_EDITABLE = 12
    TEAM_FULL = 13
    TEAM_CLOSED = 14
    ALREADY_IN_TEAM = 15
    TEAM_IN_PROGRESS = 16
    WRONG_KIND = 17


_REJECTIONS: dict[Code, type[errors.Rejected]] = {
    Code.NOT_FOUND: errors.NotFound,
    Code.NOT_STARTED: errors.NotStarted,
    Code.ENDED: errors.Ended,
    Code.INVALIDATED: errors.Invalidated,
    Code.SOLD_OUT: errors.SoldOut,
    Code.LIMIT_EXCEEDED: errors.LimitExceeded,
    Code.RATE_LIMITED: errors.RateLimited,
    Code.IDEMPOTENCY_MISMATCH: errors.IdempotencyMismatch,
    Code.FORBIDDEN: errors.Forbidden,
    Code.HOLD_EXPIRED: errors.HoldExpired,
    Code.INVALID_STATE: errors.InvalidState,
    Code.NOT_EDITABLE: errors.NotEditable,
    Code.TEAM_FULL: errors.TeamFull,
    Code.TEAM_CLOSED: errors.TeamClosed,
    Code.ALREADY_IN_TEAM: errors.AlreadyInTeam,
    Code.TEAM_IN_PROGRESS: errors.TeamInProgress,
    Code.WRONG_KIND: errors.InvalidState,
}


def rejection(code: int, message: str, **details: Any) -> errors.Rejected:
    """The exception for a script's non-zero outcome code."""
    return _REJECTIONS[Code(code)](message, **details)


def _lua_dir() -> Path:
    """``engine/lua`` inside a wheel; the repository's ``lua/`` in a source checkout."""
    packaged = Path(str(resources.files("engine"))) / "lua"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "lua"


def script_source(name: str) -> str:
    """The text sent to Redis for ``lua/<name>.lua``: the shared library, then the script."""
    lua = _lua_dir()
    return (lua / "lib" / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    """Every script of ``lua/``, registered on one client, as typed attributes."""

    NAMES = (
        "reserve_stock",
        "pay_order",
        "cancel_order",
        "refund_order",
        "expire_orders",
        "warm_campaign",
        "invalidate_campaign",
    )

    def __init__(self, client: RedisClient, max_in_flight: int = 256) -> None:
        self._client = client
        self._sources = {name: script_source(name) for name in self.NAMES}
        self._limit = asyncio.Semaphore(max_in_flight)
        make = client.register_script
        self.reserve_stock: AsyncScript = make(self._sources["reserve_stock"])
        self.pay_order: AsyncScript = make(self._sources["pay_order"])
        self.cancel_order: AsyncScript = make(self._sources["cancel_order"])
        self.refund_order: AsyncScript = make(self._sources["refund_order"])
        self.expire_orders: AsyncScript = make(self._sources["expire_orders"])
        self.warm_campaign: AsyncScript = make(self._sources["warm_campaign"])
        self.invalidate_campaign: AsyncScript = make(self._sources["invalidate_campaign"])

    async def load(self) -> None:
        """SCRIPT LOAD every script (on every primary of a cluster) so the first call is warm."""
        for source in self._sources.values():
            await guarded(self._client.script_load(source))

    async def run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> list[Any]:
        """Call one script; Redis failures become engine errors, the reply a list."""
        async with self._limit:
            reply = await guarded(script(keys=keys, args=args))
        if not isinstance(reply, list):
            raise errors.EngineError(f"script returned {type(reply).__name__}, not a list")
        return reply


async def guarded(awaitable: Any) -> Any:
    """Await a Redis call, translating Redis failures into engine errors (the one boundary)."""
    try:
        return await awaitable
    except (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.BusyLoadingError,
        redis_errors.ClusterDownError,
        redis_errors.TryAgainError,
        redis_errors.MaxConnectionsError,
        OSError,
    ) as exc:
        raise errors.Unavailable(f"Redis is unavailable: {exc}") from exc
    except redis_errors.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise errors.Unavailable("Redis is out of memory (maxmemory reached)") from exc
        raise errors.EngineError(f"Redis rejected a command: {exc}") from exc
