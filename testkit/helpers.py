"""Test-only helpers (never used by the engine itself): the one way to wait for something
(``eventually``, and ``until`` on the Redis clock), and helpers that reach under the engine."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar, cast

import redis.asyncio as aioredis

from engine import Engine, OrderState
from engine.audit import audit_campaign
from engine.events import Event
from engine.keys import campaign_of_team, keys_of, shard_of_order
from engine.models import from_ms

T = TypeVar("T")
Clock = Callable[[], Awaitable[datetime]]


@contextmanager
def sqlite_file(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to a SQLite file, committed when the block succeeds (rolled back
    when it raises) and closed either way: ``with sqlite3.connect(path)`` alone commits but
    leaves the connection open until garbage collection (a ResourceWarning)."""
    with closing(sqlite3.connect(path)) as db, db:
        yield db


# The outbox event that records an order's move into each state (docs/events.md).
EVENT_OF = {
    OrderState.HELD: "order.reserved",
    OrderState.PAID: "order.paid",
    OrderState.CANCELLED: "order.cancelled",
    OrderState.EXPIRED: "order.expired",
    OrderState.REFUNDED: "order.refunded",
}


async def age_order(engine: Engine, order_id: str, by_ms: int) -> None:
    """Move a held order's payment deadline ``by_ms`` into the past, as if time had passed.

    Rewrites the deadline in the packed record (field 7) and in the deadline index, so tests
    can drive expiry without sleeping.
    """
    keys = keys_of(shard_of_order(order_id))  # its stock bucket's, in a sharded campaign
    redis = engine.runtime.redis
    record = await redis.hget(keys.orders, order_id)
    assert isinstance(record, str), f"no order {order_id}"
    fields = record.split("|")
    fields[6] = str(int(fields[6]) - by_ms)
    await redis.hset(keys.orders, order_id, "|".join(fields))
    if await redis.zscore(keys.deadlines, order_id) is not None:
        await redis.zadd(keys.deadlines, {order_id: int(fields[6])})


async def assert_invariants(engine: Engine, campaign_id: str) -> None:
    """Fail with every violation the audit finds (invariants I1 and I2, docs/invariants.md)."""
    audit = await audit_campaign(engine.runtime, campaign_id)
    assert audit.ok, "\n".join(audit.violations)


async def age_team(engine: Engine, team_id: str, by_ms: int) -> None:
    """Move an open team's expiry ``by_ms`` into the past, as if time had passed.

    Rewrites ``expires_ms`` in the packed team record (field 8), the team's score in the expiry
    index and its joinable-index entry (which embeds the expiry).
    """
    keys = keys_of(campaign_of_team(team_id))
    redis = engine.runtime.redis
    record = await redis.hget(keys.teams, team_id)
    assert isinstance(record, str), f"no team {team_id}"
    fields = record.split("|")
    old = int(fields[7])
    fields[7] = str(old - by_ms)
    await redis.hset(keys.teams, team_id, "|".join(fields))
    if await redis.zscore(keys.team_expiry, team_id) is not None:
        await redis.zadd(keys.team_expiry, {team_id: int(fields[7])})
    for entry in map(str, await redis.zrange(keys.team_index, 0, -1)):
        if entry.endswith(f"|{team_id}"):
            await redis.zrem(keys.team_index, entry)
            sku, remaining, _, _ = entry.split("|")
            await redis.zadd(
                keys.team_index, {f"{sku}|{remaining}|{int(fields[7]):013d}|{team_id}": 0}
            )


async def stream_events(engine: Engine, campaign_id: str) -> list[Event]:
    """Every event of the campaign's outbox stream, decoded, oldest first."""
    entries = cast(
        list[tuple[str, dict[str, str]]],
        await engine.runtime.redis.xrange(keys_of(campaign_id).events),
    )
    return [Event.decode(entry_id, fields) for entry_id, fields in entries]


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    within: float = 60.0,
    *,
    what: str | None = None,
    every: float = 0.02,
) -> T:
    """Poll ``check`` every ``every`` seconds until it returns something truthy (True, or a
    value instead of None) and return that; fail after ``within`` seconds, naming ``what`` (or
    the check's docstring).

    The suite's one way to wait: on the condition itself, never for a fixed time, so a slow
    machine only makes a test slower, not red.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (value := await check()):
        if loop.time() > deadline:
            raise AssertionError(f"not within {within} s: {what or check.__doc__ or check}")
        await asyncio.sleep(every)
    return value


async def early_in_a_second(clock: Clock, before_ms: int = 400) -> None:
    """Wait until ``clock`` (the Redis clock) is within ``before_ms`` of the start of a second:
    the rate limit counts attempts per second of that clock (lua/lib/ops.lua), so a test
    making a few attempts in a row starts them where no second ends in between."""

    async def early() -> bool:
        return (await clock()).microsecond < before_ms * 1000

    await eventually(early, 5, what=f"the first {before_ms} ms of a second", every=0.01)


async def until(clock: Clock, moment: datetime, within: float = 10.0) -> None:
    """Wait until ``clock`` (the Redis clock, e.g. ``engine.runtime.now``) reads ``moment`` or
    later: for what only real time passing can bring, such as a campaign's end."""

    async def reached() -> bool:
        return await clock() >= moment

    await eventually(reached, within, what=f"the clock to reach {moment.isoformat()}")


@asynccontextmanager
async def redis_clock(url: str) -> AsyncIterator[Clock]:
    """The clock of the Redis at ``url``, read as the engine reads it (``Runtime.now``): for a
    server the test holds no engine of, such as the HTTP API's."""
    client = aioredis.Redis.from_url(url)

    async def now() -> datetime:
        seconds, micros = await client.time()
        return from_ms(int(seconds) * 1000 + int(micros) // 1000)

    try:
        yield now
    finally:
        await client.aclose()


async def reap(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """SIGKILL ``process`` if it still runs, then read its pipes to their end, which closes
    them: a subprocess left with open pipes is a ResourceWarning (an error in this suite) in
    whichever later test the garbage collector meets it. What it had printed, (stdout,
    stderr), each empty when not piped."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    out, err = await process.communicate()
    return out or b"", err or b""


async def run_cli(*args: str, env: dict[str, str], limit: float = 120.0) -> tuple[int, str, str]:
    """Run ``python -m engine.cli ARGS`` without blocking the loop: (exit code, stdout, stderr);
    killed (and its pipes closed) when it has not exited within ``limit`` seconds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    finally:
        await reap(process)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
