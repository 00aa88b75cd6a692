"""Overload and stalls (docs/http.md#overload): the excess of a spike is answered at once with
503 ``overloaded`` and Retry-After, counted by route on /metrics, while a payment is served
and health, readiness and metrics answer; a stalled Redis makes a call answer 503
``unavailable`` within FLASHTEAM_REQUEST_TIMEOUT instead of holding it, and the sale goes on
by itself when the stall ends; a payment waiting on a locked SQL store likewise. The
admission limit's adaptation is tested on its own, with a clock of the test's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from engine.api.admission import WINDOW, Admission, Priority
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisServer
from testkit.helpers import eventually
from tests.test_api import GW, expect_error, metric, new_flash, ok, reserve, running, stock_of

RESERVE_ROUTE = "POST /v1/campaigns/{campaign_id}/orders"


@pytest.fixture(scope="module")
def narrow(api_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One API worker that runs at most 2 requests at once (3 for pay and the like)."""
    extra = {"admission_min": "2", "admission_max": "2", "request_timeout": "30"}
    data = tmp_path_factory.mktemp("overload")
    with ApiServer(api_redis.url, data, workers=1, extra=extra) as server:
        yield server


@pytest.fixture
async def http(narrow: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(
        base_url=narrow.url, timeout=30, trust_env=False, limits=limits
    ) as client:
        yield client


async def test_excess_reservations_are_shed_and_a_payment_goes_through(
    http: httpx.AsyncClient, api_redis: RedisServer
) -> None:
    campaign_id = await new_flash(http, "spike", stock=10_000, limit=10)
    held = ok(await reserve(http, campaign_id, "payer"), 201)

    async def pay() -> httpx.Response:
        await asyncio.sleep(0.05)  # in the middle of the burst
        body = {"user_id": "payer", "payment_ref": "psp-spike"}
        return await http.post(f"/v1/orders/{held['order_id']}/pay", json=body, headers=GW)

    # Redis holds every write, as a busy one would, until the burst has been answered: the two
    # reservations admitted first (and the payment, in the place kept for money) stay running
    # while the rest arrives, however slowly this client sends it.
    async with aioredis.Redis.from_url(api_redis.url) as redis:
        await redis.execute_command("CLIENT", "PAUSE", "25000", "WRITE")
        try:
            burst = [asyncio.create_task(reserve(http, campaign_id, f"bot{n}")) for n in range(300)]
            paying = asyncio.create_task(pay())

            async def answered() -> bool:
                return sum(task.done() for task in burst) >= 298

            await eventually(answered, 20, what="298 of the burst answered")
            probes = [http.get(path) for path in ("/healthz", "/readyz", "/metrics")]
            health, ready, scraped = await asyncio.gather(*probes)
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        answers = await asyncio.gather(*burst)
        paid = await paying

    statuses = [r.status_code for r in answers]
    assert statuses.count(201) == 2, "a burst of 300 on a limit of 2 makes 2 reservations"
    shed = [r for r in answers if r.status_code == 503]
    assert len(shed) == 298, statuses
    for response in shed:
        expect_error(response, "overloaded")
        assert response.headers["retry-after"] == "1"
    assert ok(paid)["state"] == "paid"
    assert [health.status_code, ready.status_code, scraped.status_code] == [200, 200, 200]
    # A shed reservation changed nothing: the stock holds the others and the payer's.
    made = statuses.count(201) + 1
    item = await stock_of(http, campaign_id)
    assert item["available"] == 10_000 - made, item

    async def counted() -> float:
        text = (await http.get("/metrics")).text
        found = metric(
            text, "flashteam_http_request_seconds_count", route=RESERVE_ROUTE, outcome="overloaded"
        )
        return found or 0.0

    for _ in range(50):
        if await counted() >= len(shed):
            break
        await asyncio.sleep(0.1)
    assert await counted() >= len(shed)


async def test_requests_refused_before_running_take_no_place(http: httpx.AsyncClient) -> None:
    """401s and 400s, one after the other, leave the limit of 2 free for a reservation."""
    campaign_id = await new_flash(http, "refused")
    path = f"/v1/campaigns/{campaign_id}/orders"
    for _ in range(5):
        expect_error(await http.post(path, json={}), "unauthorized")
        expect_error(await http.post(path, json={"user_id": "u"}, headers=GW), "validation_error")
    ok(await reserve(http, campaign_id, "after"), 201)


async def test_a_stalled_redis_answers_503_within_the_request_timeout(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis_server:
        server = ApiServer(
            redis_server.url, tmp_path / "api", workers=1, extra={"request_timeout": "1"}
        )
        async with (
            running(server),
            httpx.AsyncClient(base_url=server.url, timeout=30, trust_env=False) as client,
        ):
            campaign_id = await new_flash(client, "stall")
            ok(await reserve(client, campaign_id, "u1"), 201)
            pid = redis_server.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                stalled = await reserve(client, campaign_id, "u2", key="stalled-1")
                waited = time.monotonic() - started
                error = expect_error(stalled, "unavailable")
                assert "within 1 s" in error["message"]
                assert stalled.headers["retry-after"] == "1"
                assert waited < 5, f"answered after {waited:.1f} s"
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["redis"] != "ok"
                assert (await client.get("/healthz")).status_code == 200
                scraped = await client.get("/metrics")
                assert metric(scraped.text, "flashteam_redis_up") == 0
            finally:
                os.kill(pid, signal.SIGCONT)
            # The retry with the same key finds the reservation the stalled call made.
            again = ok(await reserve(client, campaign_id, "u2", key="stalled-1"), 201)
            assert again["replayed"] is True
            assert (await stock_of(client, campaign_id))["held"] == 2


async def test_a_stalled_sql_answers_a_payment_503_within_the_request_timeout(
    api_redis: RedisServer, tmp_path: Path
) -> None:
    """Another process holds the SQLite file locked: a payment (acknowledged once SQL has it)
    answers 503 payment_pending (recorded, not declined) after 1 s instead of waiting; once
    the lock goes, the retry with the same payment reference is paid."""
    server = ApiServer(
        api_redis.url,
        tmp_path / "api",
        workers=1,
        extra={"request_timeout": "1", "pay_wait": "1"},
    )
    async with (
        running(server),
        httpx.AsyncClient(base_url=server.url, timeout=30, trust_env=False) as client,
    ):
        campaign_id = await new_flash(client, "sql-stall")
        held = ok(await reserve(client, campaign_id, "u1"), 201)
        pay = f"/v1/orders/{held['order_id']}/pay"
        body = {"user_id": "u1", "payment_ref": "psp-stall"}
        lock = sqlite3.connect(server.settings.sqlite_path, isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            stalled = await client.post(pay, json=body, headers=GW)
            assert "within 1 s" in expect_error(stalled, "payment_pending")["message"]
            assert stalled.headers["retry-after"] == "1"
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert ok(await client.post(pay, json=body, headers=GW))["state"] == "paid"


# --------------------------------------------------------------------------- the limit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_money_is_admitted_beyond_the_limit_of_the_others() -> None:
    admission = Admission(0.05, 4, 4, Clock())
    assert [admission.admit(Priority.NORMAL) for _ in range(5)] == [True] * 4 + [False]
    assert admission.admit(Priority.MONEY) and admission.admit(Priority.MONEY)
    assert not admission.admit(Priority.MONEY)  # 1.5 x the limit
    assert admission.in_flight == 6


def test_the_limit_shrinks_when_slow_and_grows_when_fast_and_refusing() -> None:
    clock = Clock()
    admission = Admission(0.05, 8, 256, clock)
    start = admission.limit
    for _ in range(30):  # slow windows: every request over the target
        assert admission.admit(Priority.NORMAL)
        clock.now += WINDOW
        admission.done(0.2)
    assert admission.limit == 8
    for _ in range(200):  # fast windows where requests were refused for the limit
        while admission.admit(Priority.NORMAL):
            pass
        for _ in range(admission.in_flight):
            admission.done(0.001)
        clock.now += WINDOW
        assert admission.admit(Priority.NORMAL)
        admission.done(0.001)
    assert admission.limit == 256 > start
    assert admission.in_flight == 0
