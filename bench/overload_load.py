"""The load generators of the T9 overload benchmark (bench/test_overload.py): closed-loop
reservations on many keep-alive connections, and a paced stream of payments, each in a process
of its own (uvloop, raw HTTP/1.1), every answer's latency kept by its status.

A connection whose reservation is answered 503 ``overloaded`` sends its next one after the
answer's ``Retry-After``, as the storefront gateway is asked to (docs/operations.md); every
other answer is followed by the next request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import resource
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from engine.local.launcher import TEST_GATEWAY_TOKEN as GATEWAY


@dataclass(slots=True)
class Outcome:
    """One generator's answers: latencies in seconds by status, over ``seconds``."""

    seconds: float = 0.0
    latencies: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    socket_errors: int = 0

    def count(self, status: int) -> int:
        return len(self.latencies.get(status, []))

    def per_s(self, status: int) -> float:
        return self.count(status) / self.seconds if self.seconds > 0 else 0.0

    def p99_ms(self, *statuses: int) -> float:
        values = sorted(v for s in statuses for v in self.latencies.get(s, []))
        if not values:
            return math.nan
        return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)] * 1000


def in_process(target: str, *args: object) -> Outcome:
    """Run ``reserve`` or ``pay`` (by name) in a spawned process; its Outcome."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run, target, args).result(600)


def _run(target: str, args: tuple[object, ...]) -> Outcome:
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    works: dict[str, Callable[..., Coroutine[Any, Any, Outcome]]] = {
        "reserve": reserve,
        "pay": pay,
    }
    return uvloop.run(works[target](*args))


def _head(url: str, path: str) -> tuple[str, int, str]:
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {GATEWAY}\r\nContent-Type: application/json\r\n"
    )
    return host, int(port), head


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str, body: bytes
) -> tuple[int, float]:
    """One request: its status, and its Retry-After in seconds (0 without one)."""
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    answer = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", answer)
    await reader.readexactly(int(length[1]) if length else 0)
    retry = re.search(rb"(?i)retry-after: *(\d+)", answer)
    return int(answer[9:12]), float(retry[1]) if retry else 0.0


async def reserve(url: str, campaign: str, sku: str, connections: int, seconds: float) -> Outcome:
    """``connections`` connections reserving (a new shopper per request) for ``seconds``."""
    host, port, head = _head(url, f"/v1/campaigns/{campaign}/orders")
    tag = uuid.uuid4().hex[:8]  # a new shopper per request, in every run
    outcome = Outcome()
    started = time.perf_counter()
    deadline = started + seconds

    async def connection(c: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            outcome.socket_errors += 1
            return
        n = 0
        try:
            while time.perf_counter() < deadline:
                n += 1
                body = (
                    f'{{"user_id":"{tag}-{c}-{n}","sku":"{sku}","qty":1,"idempotency_key":"k"}}'
                ).encode()
                sent = time.perf_counter()
                status, retry_after = await _exchange(reader, writer, head, body)
                outcome.latencies[status].append(time.perf_counter() - sent)
                if retry_after:
                    await asyncio.sleep(min(retry_after, deadline - time.perf_counter()))
        except (OSError, asyncio.IncompleteReadError):
            outcome.socket_errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(c) for c in range(connections)))
    outcome.seconds = time.perf_counter() - started
    return outcome


async def pay(url: str, orders: list[tuple[str, str]], per_s: float) -> Outcome:
    """Pay each of ``orders`` ((order id, user id)), ``per_s`` a second, on 16 connections."""
    host, port, _ = _head(url, "/")
    outcome = Outcome()
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    started = time.perf_counter()

    async def feed() -> None:
        for n, order in enumerate(orders):
            await asyncio.sleep(max(0.0, started + n / per_s - time.perf_counter()))
            queue.put_nowait(order)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                order_id, user = await queue.get()
                _, _, head = _head(url, f"/v1/orders/{order_id}/pay")
                body = f'{{"user_id":"{user}","payment_ref":"psp-{order_id}"}}'.encode()
                sent = time.perf_counter()
                status, _ = await _exchange(reader, writer, head, body)
                outcome.latencies[status].append(time.perf_counter() - sent)
                queue.task_done()
        except (OSError, asyncio.IncompleteReadError):
            outcome.socket_errors += 1
        finally:
            writer.close()

    workers = [asyncio.ensure_future(connection()) for _ in range(16)]
    await feed()
    with contextlib.suppress(TimeoutError):  # every connection failed: the rest is unanswered
        await asyncio.wait_for(queue.join(), 60)
    for worker in workers:
        worker.cancel()
    outcome.seconds = time.perf_counter() - started
    return outcome
