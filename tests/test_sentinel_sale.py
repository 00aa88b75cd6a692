"""A Sentinel failover in the middle of a 2,000-shopper HTTP sale, under the processes
`flashteam run` starts (docs/faults.md).

``LocalEngine`` runs the HTTP API (two worker processes), the flush worker and the reaper, each
its own process, on Sentinel settings (FLASHTEAM_REDIS_SENTINELS, no FLASHTEAM_REDIS_URL):
a primary, its replica and three Sentinels on loopback. Shoppers reserve one unit and pay it
over HTTP; one in ten walks away from its hold, which the reaper expires. Once 400 payments
are acknowledged the primary is SIGKILLed. The Sentinels promote the replica; the first call
on it has the campaign checked against SQL: verified when the replica had everything SQL
holds, else repaired from SQL (503 ``recovering`` meanwhile).

The verdict: every process is the one started before the failover (none restarted), and
each kept working on the new primary (payments after it, the reaper's expiries after it
flushed by the worker); the shoppers retried what failed; paid units in SQL
never above the stock and every payer paid exactly once under its own order; no order id
acknowledged to two shoppers; Redis equal to SQL order by order, `flashteam reconcile` clean.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine.core import Engine
from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN, LocalEngine
from engine.local.process import free_port
from engine.local.redis_server import RedisSentinelGroup
from engine.models import OrderState
from testkit.fixtures import sentinel_settings
from testkit.helpers import assert_invariants, eventually, run_cli
from tests.test_api_load import SKU, create_campaign, error_code, http, stock_of, worker_pids
from tests.test_redis_loss import assert_redis_matches_sql, sold_in_sql, verdict

CID = "sentinel-sale"
SHOPPERS = 2_000
CLIENTS = 48  # connections, each working through its share of the shoppers in turn
KILL_AT = 400  # payments acknowledged before the primary is killed
HOLD_SECONDS = 5
BOUND = 120.0  # seconds the sale may take, failover included


def walks_away(user: str) -> bool:
    """One shopper in ten reserves and never pays: the reaper expires the hold."""
    return int(user[1:]) % 10 == 0


@dataclass
class Ledger:
    """What the shoppers were told over HTTP."""

    held: list[tuple[str, str, float]] = field(default_factory=list)  # order, user, when
    paid: dict[str, str] = field(default_factory=dict)  # order id -> user (pay answered 200)
    recovering: int = 0  # 503 answers with reason "recovering"
    unavailable: int = 0  # other 503 answers and connection errors (no primary yet)
    reheld: int = 0  # holds gone before the payment (lost with the primary, or expired)
    killed_at: float = float("inf")
    enough_paid: asyncio.Event = field(default_factory=asyncio.Event)
    log: Path | None = None  # the engine's log, quoted when an answer is unexpected

    def explain(self, answer: httpx.Response) -> str:
        """The answer, and the tracebacks the engine logged (a 5xx other than 503 is a bug)."""
        logged = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        tracebacks = [part[:3000] for part in logged.split("Traceback")[1:]]
        return f"{answer.status_code} {answer.text}\n" + "\n".join(tracebacks[-3:])

    def owners(self) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = defaultdict(set)
        for order_id, user, _ in self.held:
            owners[order_id].add(user)
        return owners


GW = {"authorization": f"Bearer {TEST_GATEWAY_TOKEN}"}


async def until_answered(
    client: httpx.AsyncClient, path: str, body: Mapping[str, object], book: Ledger
) -> httpx.Response:
    """POST the same body (same idempotency key or payment ref) until an answer other than a
    503 or a broken connection, within BOUND."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        try:
            answer = await client.post(path, json=body, headers=GW)
        except httpx.TransportError:
            book.unavailable += 1
        else:
            if answer.status_code != 503:
                return answer
            assert answer.headers.get("retry-after") == "1", answer.headers
            reason = answer.json()["error"].get("reason")
            if reason == "recovering":
                book.recovering += 1
            else:
                book.unavailable += 1
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} unanswered for {BOUND:g} s")


async def shop(client: httpx.AsyncClient, user: str, book: Ledger) -> None:
    """Reserve one unit and pay it. A hold gone before its payment (404: lost with the
    primary; 409 hold_expired: it outlived the failover) is reserved again with a new key."""
    for attempt in range(10):
        body = {"user_id": user, "sku": SKU, "qty": 1, "idempotency_key": f"{user}-{attempt}"}
        held = await until_answered(client, f"/v1/campaigns/{CID}/orders", body, book)
        assert held.status_code == 201, book.explain(held)
        order_id = held.json()["order_id"]
        book.held.append((order_id, user, time.monotonic()))
        if walks_away(user):
            return
        pay = {"user_id": user, "payment_ref": f"pay-{user}-{attempt}"}
        paid = await until_answered(client, f"/v1/orders/{order_id}/pay", pay, book)
        if paid.status_code == 200:
            assert paid.json()["state"] == "paid", book.explain(paid)
            book.paid[order_id] = user
            if len(book.paid) >= KILL_AT:
                book.enough_paid.set()
            return
        expected = ((404, "order_not_found"), (409, "hold_expired"))
        assert (paid.status_code, error_code(paid)) in expected, book.explain(paid)
        book.reheld += 1
    raise AssertionError(f"{user} never kept a hold")


async def kill_the_primary(group: RedisSentinelGroup, book: Ledger) -> int:
    await asyncio.wait_for(book.enough_paid.wait(), BOUND)
    old = group.primary_port
    group.kill_primary()
    book.killed_at = time.monotonic()
    new = await asyncio.to_thread(group.wait_promoted)
    assert new != old
    return new


async def test_a_sentinel_failover_mid_sale_under_the_api_worker_and_reaper_processes(
    sentinel_redis: RedisSentinelGroup, tmp_path: Path
) -> None:
    settings = sentinel_settings(
        sentinel_redis,
        tmp_path,
        gateway_token=TEST_GATEWAY_TOKEN,
        admin_token=TEST_ADMIN_TOKEN,
        reaper_interval=0.2,  # the production default: the reaper as `flashteam run` runs it
    )
    users = [f"u{n}" for n in range(SHOPPERS)]
    book = Ledger(log=tmp_path / "engine.log")
    local = LocalEngine(settings, port=free_port(), workers=2, log=book.log)
    assert local.settings.redis_url is None, "no private redis-server with Sentinels"
    with local:
        started = {name: p.pid for name, p in local.processes.items()}
        api_workers = worker_pids(started["api"])
        async with http(local.url) as admin:
            await create_campaign(admin, CID, stock=SHOPPERS, limit=1, hold_seconds=HOLD_SECONDS)

        async def share(i: int) -> None:
            async with http(local.url) as client:
                for user in users[i::CLIENTS]:
                    await shop(client, user, book)

        async with asyncio.timeout(2 * BOUND):
            promoted, *_ = await asyncio.gather(
                kill_the_primary(sentinel_redis, book), *(share(i) for i in range(CLIENTS))
            )
        assert sentinel_redis.primary_port == promoted
        payers = [u for u in users if not walks_away(u)]
        assert sorted(book.paid.values()) == sorted(payers), "every payer paid exactly once"
        assert any(when > book.killed_at for *_, when in book.held)

        # The reaper expires every walked-away hold, those made after the failover too.
        async with http(local.url) as client:

            async def returned() -> bool:
                stock = await stock_of(client, CID)
                return bool(stock["held"] == 0)

            await eventually(returned, 3 * HOLD_SECONDS + 10, what="every hold expired", every=0.2)
            stock = await stock_of(client, CID)
            assert (stock["paid"], stock["available"]) == (len(payers), SHOPPERS - len(payers))
            metrics = (await client.get("/metrics")).text
            judged = re.findall(
                r"^flashteam_(?:recoveries|recovery_verifications)_total (\d+)", metrics, re.M
            )
            assert sum(map(int, judged)) >= 1, "the promoted replica was judged against SQL"

        # The worker flushed it all to SQL: reconcile compares order by order and exits 0.
        async def reconciled() -> bool:
            code, _, _ = await run_cli("reconcile", CID, env=local.env())
            return code == 0

        await eventually(reconciled, 30, what="flashteam reconcile to come back clean", every=0.5)
        # Nobody was restarted: the same processes and API workers followed the promotion.
        assert {name: p.pid for name, p in local.processes.items()} == started
        assert all(p.poll() is None for p in local.processes.values())
        assert worker_pids(started["api"]) == api_workers

        async with await Engine.open(local.settings) as engine:
            orders = await sold_in_sql(engine, CID)
            verdict(orders, book.paid, SHOPPERS)
            for order_id, owners in book.owners().items():
                assert len(owners) == 1, f"order {order_id} acknowledged to {sorted(owners)}"
                if order_id in orders:  # a hold lost with the primary is in neither place
                    assert orders[order_id].user_id in owners
            late_walkaways = [
                o
                for o, u, when in book.held
                if walks_away(u) and when > book.killed_at and o in orders
            ]
            assert late_walkaways, "holds were made after the failover"
            assert all(orders[o].state is OrderState.EXPIRED for o in late_walkaways)
            await assert_redis_matches_sql(engine, CID)
            await assert_invariants(engine, CID)
