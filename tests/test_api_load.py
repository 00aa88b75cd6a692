"""The HTTP API under concurrent load, over real loopback sockets (docs/invariants.md,
docs/http.md, docs/operations.md).

- 3,000 concurrent reservations against 100 units sell exactly 100, the rest are ``sold_out``;
- concurrent joins never over-fill a team, and quick-join + payment under load fills teams to
  exactly their size;
- SIGKILL of one API worker mid-load loses no acknowledged order: its parent restarts it, and
  retrying every request that died with its idempotency key leaves exactly one order per
  shopper who got a 201 and conserves the stock;
- SIGKILL of the API worker that runs the payment commit, three times in a stream of payments,
  on SQLite and PostgreSQL: every payment answered 200 is in SQL, and every payment whose
  answer was lost is answered 200, on its retry, only once SQL holds it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import redis.asyncio as aioredis

from engine.keys import keys_of
from engine.local.launcher import TEST_ADMIN_TOKEN as ADMIN
from engine.local.launcher import TEST_GATEWAY_TOKEN as GATEWAY
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisServer
from engine.models import Order, OrderState
from engine.settings import Settings
from engine.store import Store, open_store
from testkit.factories import campaign_json, flash_campaign, team_campaign
from testkit.helpers import eventually

GW = {"authorization": f"Bearer {GATEWAY}"}
ADM = {"authorization": f"Bearer {ADMIN}"}
SKU = "sku-1"
Json = dict[str, Any]


def unique(prefix: str) -> str:
    """A campaign id of its own on the session's shared API server and Redis."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# Plain HTTP on loopback: one unused TLS context for every client, instead of each client
# loading the CA bundle (~25 ms apiece, seconds for a couple hundred clients).
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=url, limits=limits, timeout=60.0, trust_env=False, verify=_NO_TLS
    )


@asynccontextmanager
async def http(url: str, connections: int = 1) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(url, connections) as client:
        yield client


class Clients:
    """``n`` keep-alive connections, each its own single-connection httpx client, handed out
    first come first served. (One httpx client slows down with many connections: on 2 cores
    one client with 200 connections managed ~150 requests/s, 200 clients of one ~850/s.)"""

    def __init__(self, url: str, n: int) -> None:
        self._all = [_client(url, 1) for _ in range(n)]
        self._idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in self._all:
            self._idle.put_nowait(client)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        client = await self._idle.get()
        try:
            return await client.request(method, path, **kwargs)
        finally:
            self._idle.put_nowait(client)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self._all))


@asynccontextmanager
async def pool(url: str, connections: int = 200) -> AsyncIterator[Clients]:
    clients = Clients(url, connections)
    try:
        yield clients
    finally:
        await clients.aclose()


async def create_campaign(
    client: httpx.AsyncClient | Clients,
    campaign_id: str,
    *,
    kind: str = "flash",
    stock: int = 100,
    limit: int = 1,
    team_size: int | None = None,
    hold_seconds: int = 600,
) -> Json:
    now = datetime.now(UTC)
    shape: Json = dict(stock=stock, limit=limit, hold_seconds=hold_seconds, skus=(SKU,), price=1999)
    if kind == "team":
        assert team_size is not None
        campaign = team_campaign(
            now, campaign_id, team_size=team_size, team_ttl_seconds=3600, **shape
        )
    else:
        campaign = flash_campaign(now, campaign_id, **shape)
    answer = await client.post("/v1/campaigns", json=campaign_json(campaign), headers=ADM)
    assert answer.status_code == 201, answer.text
    created = cast(Json, answer.json())
    assert created["status"] == "active", created
    return created


async def stock_of(client: httpx.AsyncClient | Clients, campaign_id: str) -> Json:
    answer = await client.get(f"/v1/campaigns/{campaign_id}", headers=GW)
    assert answer.status_code == 200, answer.text
    (stock,) = answer.json()["stock"]
    return cast(Json, stock)


def error_code(answer: httpx.Response) -> str:
    return cast(str, answer.json()["error"]["code"])


def conserved(stock: Json) -> bool:
    """Invariant I1: available + held + paid + gone == initial, available >= 0."""
    total = stock["available"] + stock["held"] + stock["paid"] + stock["gone"]
    return bool(total == stock["initial"] and stock["available"] >= 0)


# --------------------------------------------------------------------------- flash sale


async def test_3000_concurrent_reservations_sell_exactly_the_stock(api: ApiServer) -> None:
    campaign_id = unique("rush")
    async with pool(api.url) as client:
        await create_campaign(client, campaign_id, stock=100, limit=1)

        async def reserve(n: int) -> httpx.Response:
            body = {"user_id": f"u{n}", "sku": SKU, "qty": 1, "idempotency_key": "k"}
            return await client.post(f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW)

        answers = await asyncio.gather(*(reserve(n) for n in range(3_000)))
        stock = await stock_of(client, campaign_id)

    assert Counter(a.status_code for a in answers) == {201: 100, 409: 2_900}
    assert Counter(error_code(a) for a in answers if a.status_code == 409) == {"sold_out": 2_900}
    held = [a.json() for a in answers if a.status_code == 201]
    assert len({o["order_id"] for o in held}) == 100
    assert len({o["user_id"] for o in held}) == 100
    for order in held:
        assert order["campaign_id"] == campaign_id
        assert (order["state"], order["qty"], order["replayed"]) == ("held", 1, False)
        assert order["amount"] == 1999 and order["type"] == "flash"
    assert (stock["available"], stock["held"], stock["paid"], stock["gone"]) == (0, 100, 0, 0)
    assert stock["sold_out_at"] is not None


# --------------------------------------------------------------------------- teams


async def test_concurrent_joins_never_overfill_a_team(api: ApiServer) -> None:
    campaign_id, size = unique("team"), 5
    async with pool(api.url) as client:
        await create_campaign(client, campaign_id, kind="team", stock=1_000, team_size=size)
        opened = await client.post(
            f"/v1/campaigns/{campaign_id}/teams",
            json={"user_id": "leader", "sku": SKU, "qty": 1, "idempotency_key": "open"},
            headers=GW,
        )
        assert opened.status_code == 201, opened.text
        seat = opened.json()
        team_id, leader_order = seat["team_id"], seat["order_id"]
        assert seat["opened"] is True and seat["team"]["state"] == "pending"
        paid = await client.post(
            f"/v1/orders/{leader_order}/pay",
            json={"user_id": "leader", "payment_ref": "pay-leader"},
            headers=GW,
        )
        assert paid.status_code == 200 and paid.json()["state"] == "paid", paid.text

        async def join(n: int) -> httpx.Response:
            body = {"user_id": f"j{n}", "idempotency_key": "join"}
            return await client.post(f"/v1/teams/{team_id}/join", json=body, headers=GW)

        answers = await asyncio.gather(*(join(n) for n in range(300)))
        view = await client.get(f"/v1/teams/{team_id}", params={"viewer": "j0"}, headers=GW)
        orders = await client.get(f"/v1/teams/{team_id}/orders", headers=ADM)
        stock = await stock_of(client, campaign_id)

    assert Counter(a.status_code for a in answers) == {201: size - 1, 409: 300 - (size - 1)}
    assert Counter(error_code(a) for a in answers if a.status_code == 409) == {
        "team_full": 300 - (size - 1)
    }
    seated = [a.json() for a in answers if a.status_code == 201]
    assert all(s["team_id"] == team_id and s["opened"] is False for s in seated)
    assert len({s["order_id"] for s in seated}) == size - 1
    assert view.status_code == 200, view.text
    team = view.json()["team"]
    assert (team["held"], team["paid"], team["remaining"]) == (size - 1, 1, 0)
    assert view.json()["share_state"] == "full_awaiting_payment"
    assert len(view.json()["members"]) == size
    assert orders.status_code == 200, orders.text
    members = orders.json()["orders"]
    assert len(members) == size and len({o["user_id"] for o in members}) == size
    assert (stock["held"], stock["paid"]) == (size - 1, 1) and conserved(stock)


async def test_quick_join_under_load_fills_teams_to_exactly_their_size(api: ApiServer) -> None:
    campaign_id, size, shoppers = unique("quick"), 5, 400
    async with pool(api.url, 100) as client:
        await create_campaign(client, campaign_id, kind="team", stock=2_000, team_size=size)
        gate = asyncio.Semaphore(60)  # shoppers in flight: teams open while others arrive

        async def shop(n: int) -> Json:
            user = f"q{n}"
            async with gate:
                seat = await client.post(
                    f"/v1/campaigns/{campaign_id}/teams/quick-join",
                    json={"user_id": user, "sku": SKU, "idempotency_key": "quick"},
                    headers=GW,
                )
                assert seat.status_code == 201, seat.text
                order_id = seat.json()["order_id"]
                paid = await client.post(
                    f"/v1/orders/{order_id}/pay",
                    json={"user_id": user, "payment_ref": f"pay-{user}"},
                    headers=GW,
                )
                assert paid.status_code == 200 and paid.json()["state"] == "paid", paid.text
                return cast(Json, seat.json())

        seats = await asyncio.gather(*(shop(n) for n in range(shoppers)))
        team_ids = sorted({s["team_id"] for s in seats})

        async def inspect(team_id: str) -> tuple[Json, list[Json]]:
            view = await client.get(f"/v1/teams/{team_id}", params={"viewer": "q0"}, headers=GW)
            orders = await client.get(f"/v1/teams/{team_id}/orders", headers=ADM)
            assert view.status_code == 200 and orders.status_code == 200
            return cast(Json, view.json()), cast(list[Json], orders.json()["orders"])

        inspected = await asyncio.gather(*(inspect(t) for t in team_ids))
        stock = await stock_of(client, campaign_id)

    assert sum(s["opened"] for s in seats) == len(team_ids)
    seated: dict[str, str] = {}  # user -> team
    succeeded = 0
    for team_id, (view, orders) in zip(team_ids, inspected, strict=True):
        team = view["team"]
        assert team["held"] + team["paid"] <= size, view
        assert team["held"] == 0 and team["paid"] == len(orders), (view, orders)
        assert all(o["state"] == "paid" and o["team_id"] == team_id for o in orders), orders
        assert len({o["user_id"] for o in orders}) == len(orders), orders
        seated |= {o["user_id"]: team_id for o in orders}
        if team["state"] == "succeeded":
            succeeded += 1
            assert team["paid"] == size and view["share_state"] == "succeeded", view
        else:
            assert team["state"] == "open" and team["paid"] < size, view
    assert succeeded >= 1
    assert seated == {s["order"]["user_id"]: s["team_id"] for s in seats}
    assert len(seated) == shoppers
    assert (stock["held"], stock["paid"]) == (0, shoppers) and conserved(stock)


# --------------------------------------------------------------------------- kill -9


def worker_pids(supervisor: int) -> set[int]:
    """The API's worker processes under their parent (not multiprocessing's tracker)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                pids.add(child)
    return pids


def gone(pid: int) -> bool:
    """The process exited (a zombie not yet reaped by its parent counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rsplit(")", 1)[1].split()[0] == "Z"


@dataclass
class Ledger:
    """What the shoppers were told, per user."""

    acked: dict[str, str] = field(default_factory=dict)  # user -> order id (reserve 201)
    paid: set[str] = field(default_factory=set)  # users whose payment got a 200
    rejected: dict[str, str] = field(default_factory=dict)  # user -> error code
    lost_reserve: set[str] = field(default_factory=set)  # the connection died: unknown
    lost_pay: set[str] = field(default_factory=set)
    after_kill: int = 0  # 201/200 answers received after the SIGKILL
    killed_at: float = float("inf")


async def _reserve(
    client: httpx.AsyncClient | Clients, campaign_id: str, user: str
) -> httpx.Response:
    body = {"user_id": user, "sku": SKU, "qty": 1, "idempotency_key": f"key-{user}"}
    return await client.post(f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW)


async def _pay(client: httpx.AsyncClient | Clients, order_id: str, user: str) -> httpx.Response:
    body = {"user_id": user, "payment_ref": f"pay-{user}"}
    return await client.post(f"/v1/orders/{order_id}/pay", json=body, headers=GW)


async def _shop(url: str, campaign_id: str, users: list[str], book: Ledger) -> None:
    """One client (its own connection) working through its users: reserve, then pay."""
    async with http(url, connections=1) as client:
        for user in users:
            try:
                answer = await _reserve(client, campaign_id, user)
            except httpx.TransportError:
                book.lost_reserve.add(user)
                continue
            if answer.status_code != 201:
                assert answer.status_code == 409, answer.text
                book.rejected[user] = error_code(answer)
                continue
            order_id = answer.json()["order_id"]
            book.acked[user] = order_id
            book.after_kill += time.monotonic() > book.killed_at
            try:
                paid = await _pay(client, order_id, user)
            except httpx.TransportError:
                book.lost_pay.add(user)
                continue
            assert paid.status_code == 200 and paid.json()["state"] == "paid", paid.text
            book.paid.add(user)
            book.after_kill += time.monotonic() > book.killed_at


async def _kill_a_worker(server: ApiServer, book: Ledger, trigger: Awaitable[bool]) -> int:
    assert server.process is not None
    supervisor = server.process.pid
    workers = worker_pids(supervisor)
    assert len(workers) == 2, workers
    await trigger
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    book.killed_at = time.monotonic()

    async def dead() -> bool:
        return gone(victim)

    await eventually(dead, 10, what=f"worker {victim} to die")
    return victim


async def _redis_orders(redis_url: str, campaign_id: str) -> list[Order]:
    """Every order of the campaign as Redis holds it: the listing to reconcile against."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        records = cast(dict[str, str], await client.hgetall(keys_of(campaign_id).orders))
    finally:
        await client.aclose()
    return [Order.from_record(order_id, record) for order_id, record in records.items()]


async def test_a_killed_worker_loses_no_acknowledged_order(
    api_redis: RedisServer, tmp_path: Path
) -> None:
    campaign_id, initial, clients = unique("kill"), 700, 32
    users = [f"s{n}" for n in range(900)]
    book = Ledger()
    with ApiServer(api_redis.url, tmp_path / "api", workers=2) as server:
        assert server.process is not None
        supervisor = server.process.pid
        before = worker_pids(supervisor)
        async with http(server.url) as admin:
            await create_campaign(admin, campaign_id, stock=initial, limit=1)

        async def acked() -> bool:
            return len(book.acked) >= 200

        enough_acked = eventually(acked, 30, what="200 acknowledged orders")

        async with asyncio.timeout(60):
            load = asyncio.gather(
                *(_shop(server.url, campaign_id, users[i::clients], book) for i in range(clients))
            )
            victim, _ = await asyncio.gather(_kill_a_worker(server, book, enough_acked), load)
        # The supervisor stayed up, and replaced the dead worker with a new one.
        assert server.process.poll() is None

        async def restarted() -> bool:
            return len(worker_pids(supervisor) - before) == 1

        await eventually(restarted, 20, what="the API parent to restart a worker")
        now_running = worker_pids(supervisor)
        assert victim not in now_running and len(now_running) == 2, (victim, now_running)
        assert book.after_kill > 0, "no request succeeded after the kill"

        async with pool(server.url, 50) as client:
            # Stock is conserved, and every acknowledged hold or payment is still there.
            stock = await stock_of(client, campaign_id)
            assert conserved(stock), stock
            assert stock["held"] + stock["paid"] >= len(book.acked)
            assert stock["paid"] >= len(book.paid)
            await _check_acknowledged(client, book)
            # Acknowledged reservations retried: the same order, replayed, not a second one.
            await _check_replays(client, campaign_id, dict(sorted(book.acked.items())[:50]))
            # Retry every request that died, with the same idempotency key / payment ref.
            await _retry_lost(client, campaign_id, book)
            stock = await stock_of(client, campaign_id)

    answered = set(book.acked) | set(book.rejected)
    assert answered == set(users), "every shopper has an answer after the retries"
    assert set(book.rejected.values()) <= {"sold_out"}
    assert book.paid == set(book.acked)
    orders = await _redis_orders(api_redis.url, campaign_id)
    # Exactly one order per shopper who got a 201, the acknowledged one, and no other order.
    assert sorted(o.order_id for o in orders) == sorted(book.acked.values())
    assert {o.user_id: o.order_id for o in orders} == book.acked
    assert all(o.state.value == "paid" for o in orders)
    assert conserved(stock), stock
    assert (stock["held"], stock["paid"], stock["gone"]) == (0, len(orders), 0)
    assert stock["available"] == initial - len(orders)
    if len(orders) < initial:  # stock left over: nobody may have been refused
        assert not book.rejected


async def _check_acknowledged(client: httpx.AsyncClient | Clients, book: Ledger) -> None:
    """Each acknowledged order reads back in its acknowledged state or a later one."""

    async def check(user: str, order_id: str) -> None:
        answer = await client.get(f"/v1/orders/{order_id}", params={"user_id": user}, headers=GW)
        assert answer.status_code == 200, answer.text
        order = answer.json()
        assert (order["order_id"], order["user_id"]) == (order_id, user)
        expected = ("paid",) if user in book.paid else ("held", "paid")
        assert order["state"] in expected, (order, expected)

    await asyncio.gather(*(check(u, o) for u, o in book.acked.items()))


async def _check_replays(
    client: httpx.AsyncClient | Clients, campaign_id: str, acked: dict[str, str]
) -> None:
    async def check(user: str, order_id: str) -> None:
        answer = await _reserve(client, campaign_id, user)
        assert answer.status_code == 201, answer.text
        assert (answer.json()["order_id"], answer.json()["replayed"]) == (order_id, True)

    await asyncio.gather(*(check(u, o) for u, o in acked.items()))


async def _retry_lost(client: httpx.AsyncClient | Clients, campaign_id: str, book: Ledger) -> None:
    """Replay every request whose answer was lost: a reservation that did commit comes back
    as the same order (``replayed``); a payment retried with its ref is a no-op success."""

    async def again(user: str) -> None:
        answer = await _reserve(client, campaign_id, user)
        if answer.status_code == 409:
            book.rejected[user] = error_code(answer)
            return
        assert answer.status_code == 201, answer.text
        book.acked[user] = answer.json()["order_id"]
        book.lost_pay.add(user)

    async def pay(user: str) -> None:
        answer = await _pay(client, book.acked[user], user)
        assert answer.status_code == 200 and answer.json()["state"] == "paid", answer.text
        book.paid.add(user)

    await asyncio.gather(*(again(u) for u in sorted(book.lost_reserve)))
    await asyncio.gather(*(pay(u) for u in sorted(book.lost_pay)))


# ------------------------------------------------------- kill -9 of the payment committer


@dataclass
class Payments:
    """A stream of payments of held orders, and what their payers were told."""

    url: str
    orders: dict[str, str]  # user -> held order id
    paid: set[str] = field(default_factory=set)  # answered 200 paid
    lost: set[str] = field(default_factory=set)  # the connection died, or 503: not known


async def _pay_each(book: Payments, users: list[str]) -> None:
    """One payer on its own connection, paying for ``users`` in turn."""
    async with http(book.url) as client:
        for user in users:
            try:
                answer = await _pay(client, book.orders[user], user)
            except httpx.TransportError:
                book.lost.add(user)
                continue
            if answer.status_code == 503:
                assert error_code(answer) in ("payment_pending", "unavailable"), answer.text
                book.lost.add(user)
                continue
            assert answer.status_code == 200 and answer.json()["state"] == "paid", answer.text
            book.paid.add(user)


async def _kill_workers(supervisor: int, book: Payments, rounds: int) -> None:
    """``rounds`` times: after a random number of further payments, kill -9 a worker picked
    at random, and wait for its parent to replace it."""
    chance = random.Random()
    for round_ in range(rounds):
        workers = worker_pids(supervisor)
        at_least = 60 * round_ + chance.randrange(60)

        async def some_paid(at_least: int = at_least) -> bool:
            return len(book.paid) >= at_least

        await eventually(some_paid, 30, what=f"{at_least} payments before a kill")
        victim = chance.choice(sorted(workers))
        os.kill(victim, signal.SIGKILL)

        async def replaced(victim: int = victim, workers: set[int] = workers) -> bool:
            return gone(victim) and len(worker_pids(supervisor) - workers) == 1

        await eventually(replaced, 20, what=f"worker {victim} replaced")


async def _paid_in_sql(store: Store, order_id: str, user: str) -> bool:
    stored = await store.get_order(order_id)
    return (
        stored is not None
        and stored.state is OrderState.PAID
        and stored.payment_ref == f"pay-{user}"
    )


async def _retry_until_paid(book: Payments, store: Store, user: str) -> None:
    """A gateway's retries of a payment whose answer it lost: 200 only once SQL holds it.
    Before them, its shopper reads the order: paid only if SQL holds the payment."""
    async with http(book.url) as client:
        order_id = book.orders[user]
        read = await client.get(f"/v1/orders/{order_id}", params={"user_id": user}, headers=GW)
        assert read.status_code in (200, 503), read.text
        if read.status_code == 200 and read.json()["state"] == "paid":
            assert await _paid_in_sql(store, order_id, user), (user, read.text)
        for _ in range(10):
            answer = await _pay(client, book.orders[user], user)
            if answer.status_code == 200:
                assert await _paid_in_sql(store, book.orders[user], user), (user, answer.text)
                return
            assert answer.status_code == 503, answer.text
            await asyncio.sleep(0.5)
    raise AssertionError(f"the payment of {user} stayed pending: {answer.text}")


async def test_a_killed_payment_committer_acknowledges_only_what_sql_holds(
    api_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """kill -9 of an API worker, the process that runs its payments' group commit, three times
    at random moments of a stream of payments, on SQLite and on PostgreSQL. No flush worker
    runs, so a paid order in SQL can only come from a payment commit. Every payment answered
    200 is paid in SQL with its reference, record by record; every payment whose answer was
    lost (the connection died, or 503 payment_pending) is retried with its reference and
    answered 200 only once SQL holds it; in the end SQL holds every order paid, exactly."""
    campaign_id, users, payers = unique("paykill"), [f"p{n}" for n in range(600)], 32
    extra = {"database_url": database_url}
    store = await open_store(Settings(redis_url=api_redis.url, database_url=database_url))
    try:
        with ApiServer(api_redis.url, tmp_path / "api", workers=2, extra=extra) as server:
            assert server.process is not None
            async with pool(server.url, 50) as client:
                await create_campaign(client, campaign_id, stock=len(users), limit=1)
                held = await asyncio.gather(*(_reserve(client, campaign_id, u) for u in users))
            assert [answer.status_code for answer in held] == [201] * len(users)
            orders = {u: answer.json()["order_id"] for u, answer in zip(users, held, strict=True)}
            book = Payments(server.url, orders)
            async with asyncio.timeout(120):
                await asyncio.gather(
                    _kill_workers(server.process.pid, book, rounds=3),
                    *(_pay_each(book, users[i::payers]) for i in range(payers)),
                )
            assert book.lost, "a kill in the middle of payments cut some of them"
            for user in sorted(book.paid):  # acknowledged: in SQL already, with no flush
                assert await _paid_in_sql(store, orders[user], user), user
            async with asyncio.timeout(120):
                await asyncio.gather(*(_retry_until_paid(book, store, u) for u in book.lost))
        stored = {u: await store.get_order(orders[u]) for u in users}
    finally:
        await store.close()
    found = {u: (o.order_id, o.state, o.payment_ref) for u, o in stored.items() if o is not None}
    assert found == {u: (orders[u], OrderState.PAID, f"pay-{u}") for u in users}
