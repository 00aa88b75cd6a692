"""The Lua scripts: loaded once at start-up, called through one translating boundary.

Each ``lua/*.lua`` file is one atomic operation; ``lua/lib/common.lua`` is prepended to each
(EVAL has no module system). redis-py's ``AsyncScript`` does EVALSHA and, on NOSCRIPT (a Redis
restart, failover or SCRIPT FLUSH), loads the script and retries, so recovery needs no step.
Redis errors are translated here, and only here, into engine errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from engine import errors
from engine.models import from_ms

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


_MESSAGES = {
    Code.NOT_FOUND: "no such campaign, sku, order or team",
    Code.NOT_STARTED: "the campaign has not started yet",
    Code.ENDED: "the campaign has ended",
    Code.INVALIDATED: "the campaign was invalidated",
    Code.SOLD_OUT: "sold out",
    Code.LIMIT_EXCEEDED: "the per-user limit would be exceeded",
    Code.RATE_LIMITED: "too many attempts: retry after the given delay",
    Code.IDEMPOTENCY_MISMATCH: "this idempotency key was used with other parameters",
    Code.FORBIDDEN: "the order belongs to another user",
    Code.HOLD_EXPIRED: "the hold expired before payment: the payment must be refunded",
    Code.INVALID_STATE: "the order is not in a state that allows this",
    Code.NOT_EDITABLE: "the campaign can no longer be changed this way",
    Code.TEAM_FULL: "every seat of the team is taken",
    Code.TEAM_CLOSED: "the team is not open for joining or paying",
    Code.ALREADY_IN_TEAM: "the user already has a seat in this team",
    Code.TEAM_IN_PROGRESS: "a paid seat of a team in progress cannot be cancelled or refunded",
    Code.WRONG_KIND: "the campaign is of the other kind (flash or team)",
}
_ORDER_STATES = {"H": "held", "P": "paid", "C": "cancelled", "E": "expired", "R": "refunded"}
_TEAM_STATES = {"W": "pending", "O": "open", "S": "succeeded", "F": "failed", "D": "dissolved"}


def rejection(code: int, message: str, **details: Any) -> errors.Rejected:
    """The exception for a script's non-zero outcome code."""
    return _REJECTIONS[Code(code)](message, **details)


def _details(code: Code, extra: Any) -> dict[str, Any]:
    if extra is None:
        return {}
    if code is Code.NOT_STARTED:
        return {"starts_at": from_ms(int(extra))}
    if code is Code.ENDED:
        return {"ends_at": from_ms(int(extra))}
    if code is Code.RATE_LIMITED:
        return {"retry_after": int(extra) / 1000}
    if code is Code.SOLD_OUT:
        return {"available": int(extra)}
    if code is Code.LIMIT_EXCEEDED:
        return {"units_left": int(extra)}
    if code is Code.INVALID_STATE:
        return {"state": _ORDER_STATES.get(extra, extra)}
    if code is Code.TEAM_CLOSED:
        return {"team_state": _TEAM_STATES.get(extra, extra)}
    if code is Code.NOT_FOUND:
        return {"sku": extra}
    return {}


def check_reply(reply: list[Any]) -> list[Any]:
    """Return a script's reply when its code is OK; else raise the matching rejection with
    its details (``starts_at``, ``retry_after``, ``available``, ...)."""
    if reply[0] == 0:
        return reply
    code = Code(reply[0])
    raise rejection(code, _MESSAGES[code], **_details(code, reply[1] if len(reply) > 1 else None))


def _lua_dir() -> Path:
    """``engine/lua`` inside a wheel; the repository's ``lua/`` in a source checkout."""
    packaged = Path(str(resources.files("engine"))) / "lua"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "lua"


def script_source(name: str) -> str:
    """The text sent to Redis for ``lua/<name>.lua``: the shared libraries, then the script."""
    lua = _lua_dir()
    parts = [lua / "lib" / name for name in ("common.lua", "team.lua", "ops.lua")]
    parts.append(lua / f"{name}.lua")
    return "\n".join(part.read_text() for part in parts)


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
        "open_team",
        "join_team",
        "quick_join",
        "expire_teams",
        "list_teams",
        "ack_events",
        "batch",
    )

    def __init__(self, client: RedisClient, max_in_flight: int = 256) -> None:
        self._client = client
        self._sources = {name: script_source(name) for name in self.NAMES}
        self._limit = asyncio.Semaphore(max_in_flight)
        # Called with (script name, seconds) after every call when set (the API's metrics).
        self.observe: Callable[[str, float], None] | None = None
        make = client.register_script
        self.reserve_stock: AsyncScript = make(self._sources["reserve_stock"])
        self.pay_order: AsyncScript = make(self._sources["pay_order"])
        self.cancel_order: AsyncScript = make(self._sources["cancel_order"])
        self.refund_order: AsyncScript = make(self._sources["refund_order"])
        self.expire_orders: AsyncScript = make(self._sources["expire_orders"])
        self.warm_campaign: AsyncScript = make(self._sources["warm_campaign"])
        self.invalidate_campaign: AsyncScript = make(self._sources["invalidate_campaign"])
        self.open_team: AsyncScript = make(self._sources["open_team"])
        self.join_team: AsyncScript = make(self._sources["join_team"])
        self.quick_join: AsyncScript = make(self._sources["quick_join"])
        self.expire_teams: AsyncScript = make(self._sources["expire_teams"])
        self.list_teams: AsyncScript = make(self._sources["list_teams"])
        self.ack_events: AsyncScript = make(self._sources["ack_events"])
        self.batch: AsyncScript = make(self._sources["batch"])
        self._names = {id(getattr(self, name)): name for name in self.NAMES}

    async def load(self) -> None:
        """SCRIPT LOAD every script (on every primary of a cluster) so the first call is warm."""
        for source in self._sources.values():
            await guarded(self._client.script_load(source))

    async def run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> list[Any]:
        """Call one script; Redis failures become engine errors, the reply a list."""
        async with self._limit:
            if self.observe is None:
                reply = await guarded(script(keys=keys, args=args))
            else:
                started = time.perf_counter()
                try:
                    reply = await guarded(script(keys=keys, args=args))
                finally:
                    self.observe(
                        self._names.get(id(script), "other"), time.perf_counter() - started
                    )
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
