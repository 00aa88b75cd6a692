"""What the benchmarks share: a closed-loop load driver, percentiles, process RSS, a fresh
engine on a flushed Redis, running a benchmark's coroutine on uvloop (the event loop the
HTTP API runs on), and the progress lines of the long ones (bench/progress.py).

The driver runs ``concurrency`` callers; each calls ``op(n)`` with a fresh sequence number,
again and again (a closed loop: every caller has one request in flight). After ``warmup``
seconds it counts the requests that complete within the next ``seconds`` and keeps their
latencies. With ``limit`` the callers stop after that many requests in all (operations that
consume a finite resource, such as pre-opened team seats); the window then ends at the last
completion, and ``progress`` names a progress line over them (updated twice a second from the
event loop, not from the callers).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
import uvloop

from bench.progress import Progress, ticking
from engine import Engine
from engine.errors import SoldOut
from engine.models import to_ms
from testkit.factories import make_settings

T = TypeVar("T")

Op = Callable[[int], Awaitable[bool]]


_LINES_OPENED: set[str] = set()  # the tests that have drawn a progress line already


def progress_line(label: str, total: float, unit: str = "") -> Progress:
    """A progress line on stderr (``make bench`` runs pytest with ``-s``); the first of a test
    starts on a new line, pytest ``-v`` having left the test's name open on the current one."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    fresh = bool(test) and test not in _LINES_OPENED
    _LINES_OPENED.add(test)
    return Progress(label, total, unit=unit, fresh_line=fresh)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run one benchmark coroutine on a fresh uvloop event loop."""
    return uvloop.run(main)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One closed-loop run: requests completed in the window, rejected ones among them."""

    concurrency: int
    completed: int
    rejected: int
    seconds: float
    latencies: list[float]  # seconds, one per completed request in the window

    @property
    def rate(self) -> float:
        """Completed requests per second over the window."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def succeeded(self) -> int:
        return self.completed - self.rejected

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def drive(
    op: Op,
    concurrency: int,
    *,
    seconds: float,
    warmup: float,
    limit: int | None = None,
    progress: str | None = None,
) -> Measurement:
    """Run ``concurrency`` closed-loop callers of ``op`` and measure the window after warmup.

    ``op(n)`` returns True for a success, False for an expected rejection (sold out); an
    exception fails the benchmark. ``progress``: with ``limit``, the label of a progress line
    over the requests measured so far (those of the warm-up not among them: use it with
    ``warmup=0``).
    """
    numbers = itertools.count()
    begin = time.perf_counter()
    start = begin + warmup
    end = start + seconds
    latencies: list[float] = []
    rejected = 0
    last = start

    async def caller() -> None:
        nonlocal rejected, last
        while True:
            n = next(numbers)
            if limit is not None and n >= limit:
                return
            sent = time.perf_counter()
            if sent >= end:
                return
            ok = await op(n)
            received = time.perf_counter()
            if start <= received <= end:
                latencies.append(received - sent)
                last = max(last, received)
                if not ok:
                    rejected += 1

    if progress is not None and limit is not None:
        async with ticking(progress_line(progress, limit, "requests"), lambda: len(latencies)):
            await asyncio.gather(*(caller() for _ in range(concurrency)))
    else:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    if limit is not None and time.perf_counter() < end:
        if last <= start:
            raise AssertionError(f"{limit} requests ran out during the warm-up: raise the limit")
        end = last  # the callers ran out of requests before the window closed
    return Measurement(concurrency, len(latencies), rejected, end - start, latencies)


def flush_redis(url: str) -> None:
    """Empty the benchmark's Redis (every key and script) so runs do not share state."""
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()


@asynccontextmanager
async def fresh_engine(
    url: str, data_dir: Path, name: str, **changes: object
) -> AsyncIterator[Engine]:
    """An engine on a flushed Redis with its own SQLite file: the test suite's settings
    (``make_settings``) with ``changes``."""
    flush_redis(url)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=data_dir))
    settings = make_settings(url, folder, **changes)
    async with await Engine.open(settings) as engine:
        yield engine


@dataclass(frozen=True, slots=True)
class Rush:
    """What T7's rush saw: the answers, when it began (Redis clock, ms), how long all the
    answers took (s), and this process's peak RSS."""

    sold: int
    rejected: int
    first_ms: int
    elapsed: float
    peak_rss: int


async def rush(
    engine: Engine, campaign_id: str, sku: str, users: int, callers: int, label: str
) -> Rush:
    """T7's shoppers: ``users`` of them, ``callers`` at a time, each reserving one unit of
    ``sku`` once; counts the answers (a progress line named ``label``) and samples RSS every
    100,000."""
    numbers = itertools.count()
    sold = rejected = 0
    peak_rss = rss_bytes()

    async def shopper() -> None:
        nonlocal sold, rejected, peak_rss
        while (n := next(numbers)) < users:
            try:
                await engine.flash.reserve(campaign_id, f"u{n}", sku, 1, "k")
                sold += 1
            except SoldOut:
                rejected += 1
            if n % 100_000 == 0:
                peak_rss = max(peak_rss, rss_bytes())

    bar = progress_line(label, users, "answers")
    async with ticking(bar, lambda: sold + rejected):
        first_ms = to_ms(await engine.runtime.now())
        started = time.perf_counter()
        await asyncio.gather(*(shopper() for _ in range(callers)))
        elapsed = time.perf_counter() - started
    return Rush(sold, rejected, first_ms, elapsed, peak_rss)


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def redis_info(url: str, section: str) -> dict[str, Any]:
    """``INFO <section>`` of the benchmark's Redis."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        info: dict[str, Any] = client.info(section)
        return info
    finally:
        client.close()
