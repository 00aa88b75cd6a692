"""The durable store, on both backends: SQLite (a file per test) and PostgreSQL (a private
cluster per session, a fresh database per test)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from engine.errors import AlreadyExists, Unavailable
from engine.local.postgres import PostgresServer
from engine.local.process import free_port
from engine.models import (
    Campaign,
    CampaignKind,
    Item,
    Order,
    OrderKind,
    OrderState,
    Seat,
    Team,
    TeamState,
    from_ms,
)
from engine.store import Batch, Store, TeamFill, Totals
from engine.store import sqlite as sqlite_store
from engine.store.postgres import _COPY_FROM, PostgresStore
from engine.store.schema import MIGRATIONS, SCHEMA_VERSION
from engine.store.sqlite import SqliteStore
from testkit.factories import deadlocks
from testkit.helpers import eventually, sqlite_file

BASE = from_ms(1_800_000_000_000)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def ms(seconds: float) -> int:
    return 1_800_000_000_000 + round(seconds * 1000)


@dataclass
class Backend:
    """One store backend under test: how to open it, and a raw look at its version table."""

    name: str
    open: Callable[[], Awaitable[Store]]
    versions: Callable[[], Awaitable[list[int]]]


async def _pg_versions(url: str) -> list[int]:
    conn: Any = await asyncpg.connect(url)
    try:
        return [int(r["version"]) for r in await conn.fetch("SELECT version FROM schema_version")]
    finally:
        await conn.close()


async def _sqlite_versions(path: Path) -> list[int]:
    with sqlite_file(path) as db:
        return [int(r[0]) for r in db.execute("SELECT version FROM schema_version")]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        return Backend("sqlite", lambda: SqliteStore.open(path), lambda: _sqlite_versions(path))
    url = cast(str, request.getfixturevalue("pg_url"))
    return Backend("postgres", lambda: PostgresStore.open(url), lambda: _pg_versions(url))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    yield opened
    await opened.close()


def flash(campaign_id: str = "sale", *, starts: float = 0, ends: float = 3600) -> Campaign:
    return Campaign(
        id=campaign_id,
        kind=CampaignKind.FLASH,
        title=f"Flash {campaign_id}",
        starts_at=at(starts),
        ends_at=at(ends),
        items=(Item("sku-1", 1999, 100), Item("sku-2", 500, 7)),
        per_user_limit=2,
        hold_seconds=60,
    )


def group(campaign_id: str = "group") -> Campaign:
    return Campaign(
        id=campaign_id,
        kind=CampaignKind.TEAM,
        title="Team deal",
        starts_at=at(0),
        ends_at=at(3600),
        items=(Item("sku-1", 990, 30),),
        per_user_limit=1,
        hold_seconds=60,
        team_size=3,
        team_ttl_seconds=600,
    )


def order(
    n: int,
    *,
    campaign_id: str = "sale",
    user_id: str = "alice",
    sku: str = "sku-1",
    qty: int = 1,
    price: int = 1999,
    state: OrderState = OrderState.HELD,
    version: int = 1,
    team_id: str | None = None,
    payment_ref: str | None = None,
) -> Order:
    return Order(
        order_id=f"{campaign_id}.o{n}",
        campaign_id=campaign_id,
        user_id=user_id,
        sku=sku,
        qty=qty,
        amount=qty * price,
        state=state,
        created_at=at(n),
        expires_at=at(n + 60),
        version=version,
        kind=OrderKind.FLASH if team_id is None else OrderKind.TEAM,
        team_id=team_id,
        payment_ref=payment_ref,
    )


def team(
    n: int,
    *,
    state: TeamState = TeamState.OPEN,
    version: int = 1,
    held: int = 0,
    paid: int = 1,
    why: str | None = None,
) -> Team:
    team_id = f"group.t{n}"
    opened = None if state is TeamState.PENDING else at(n + 5)
    return Team(
        team_id=team_id,
        campaign_id="group",
        leader_id="lead",
        sku="sku-1",
        qty=1,
        size=3,
        state=state,
        created_at=at(n),
        opened_at=opened,
        expires_at=None if opened is None else opened + timedelta(seconds=600),
        held=held,
        paid=paid,
        version=version,
        why=why,
        seats=(Seat(f"group.o{n}", "lead"),),
    )


def batch(
    *orders: Order, teams: tuple[Team, ...] = (), invalidations: dict[str, int] | None = None
) -> Batch:
    result = Batch()
    for o in orders:
        result.add_order(o, ms(1000 + o.version))
    for t in teams:
        result.add_team(t, ms(1000 + t.version))
    result.invalidations.update(invalidations or {})
    return result


async def test_open_creates_the_schema_and_reopen_is_a_no_op(backend: Backend) -> None:
    first = await backend.open()
    await first.insert_campaign(flash())
    await first.close()
    assert await backend.versions() == [SCHEMA_VERSION] == [6]
    second = await backend.open()
    try:
        assert await backend.versions() == [SCHEMA_VERSION]
        assert await second.get_campaign("sale") == flash()
    finally:
        await second.close()


async def test_concurrent_opens_migrate_once(backend: Backend) -> None:
    stores = await asyncio.gather(*(backend.open() for _ in range(3)))
    for opened in stores:
        await opened.close()
    assert await backend.versions() == [SCHEMA_VERSION]


async def test_insert_get_and_replace_campaign(store: Store) -> None:
    assert await store.get_campaign("sale") is None
    await store.insert_campaign(flash())
    await store.insert_campaign(group())
    assert await store.get_campaign("sale") == flash()
    assert await store.get_campaign("group") == group()
    changed = flash(ends=7200)
    await store.replace_campaign(changed)
    assert await store.get_campaign("sale") == changed


async def test_team_deal_options_are_stored_and_switched_off(store: Store) -> None:
    """The per-order cap and automatic success (their columns, migration 5) and the leader
    price (in the items' JSON) come back as stored; None switches them off again."""
    dealt = dataclasses.replace(
        group(),
        team_size=4,
        per_user_limit=3,
        items=(Item("sku-1", 990, 30, leader_price=490), Item("sku-2", 500, 5)),
        per_order_limit=1,
        auto_success_min_paid=2,
    )
    await store.insert_campaign(dealt)
    assert await store.get_campaign("group") == dealt
    plain = dataclasses.replace(
        dealt,
        items=(Item("sku-1", 990, 30), Item("sku-2", 500, 5)),
        per_order_limit=None,
        auto_success_min_paid=None,
    )
    await store.replace_campaign(plain)
    assert await store.get_campaign("group") == plain


async def test_a_schema_4_database_migrates_keeping_its_campaigns(tmp_path: Path) -> None:
    """A SQLite file written before the team deal options opens at the current schema; its
    campaigns read with every option off."""
    path = tmp_path / "old.db"
    with sqlite_file(path) as db:
        for statements in MIGRATIONS[:4]:
            for statement in statements:
                db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version (version) VALUES (4)")
        db.execute(
            "INSERT INTO campaigns (id, kind, title, starts_at, ends_at, per_user_limit,"
            " hold_seconds, team_size, team_ttl_seconds, invalidated_at, items, shards)"
            " VALUES ('group', 'team', 'Team deal', ?, ?, 1, 60, 3, 600, NULL,"
            ' \'[{"sku": "sku-1", "price": 990, "stock": 30}]\', NULL)',
            (ms(0), ms(3600)),
        )
    store = await SqliteStore.open(path)
    try:
        assert await _sqlite_versions(path) == [SCHEMA_VERSION]
        assert await store.get_campaign("group") == group()
    finally:
        await store.close()


async def test_insert_taken_id_raises_already_exists(store: Store) -> None:
    await store.insert_campaign(flash())
    with pytest.raises(AlreadyExists) as caught:
        await store.insert_campaign(flash(ends=60))
    assert caught.value.details == {"id": "sale"}
    assert await store.get_campaign("sale") == flash()


async def test_campaigns_ending_after(store: Store) -> None:
    await store.insert_campaign(flash("late", starts=100, ends=500))
    await store.insert_campaign(flash("early", starts=0, ends=400))
    await store.insert_campaign(flash("over", starts=0, ends=100))
    found = await store.campaigns_ending_after(at(100))
    assert [c.id for c in found] == ["early", "late"]  # by starts_at
    assert await store.campaigns_ending_after(at(500)) == []


async def test_apply_writes_orders_and_teams(store: Store) -> None:
    first = order(1, user_id="alice")
    second = order(2, user_id="bob", sku="sku-2", qty=2, price=500, state=OrderState.PAID)
    await store.apply(batch(first, second, teams=(team(1), team(2, state=TeamState.PENDING))))
    assert await store.get_order("sale.o1") == first
    assert await store.get_order("sale.o2") == second
    assert await store.get_order("sale.o3") is None
    assert await store.team_totals("group") == {"open": 1, "pending": 1}


async def test_apply_of_an_empty_batch_is_fine(store: Store) -> None:
    await store.apply(Batch())
    assert await store.order_totals("sale") == []


async def test_an_older_version_never_overwrites_a_newer_one(store: Store) -> None:
    paid = order(1, state=OrderState.PAID, version=2, payment_ref="pay-1")
    await store.apply(batch(paid))
    await store.apply(batch(order(1, version=1)))  # a replayed, older event
    assert await store.get_order("sale.o1") == paid
    await store.apply(batch(paid))  # the same version again: no change
    assert await store.get_order("sale.o1") == paid

    await store.apply(batch(order(2, version=1)))
    refunded = order(2, state=OrderState.REFUNDED, version=3, payment_ref="pay-2")
    await store.apply(batch(refunded))
    assert await store.get_order("sale.o2") == refunded

    await store.apply(batch(teams=(team(1, state=TeamState.SUCCEEDED, version=4, paid=3),)))
    await store.apply(batch(teams=(team(1, version=2),)))
    assert await store.team_totals("group") == {"succeeded": 1}


async def test_user_orders_newest_first_with_their_type(store: Store) -> None:
    await store.apply(
        batch(
            order(1),
            order(3, campaign_id="group", price=990, team_id="group.t1"),
            order(2, state=OrderState.CANCELLED, version=2),
            order(4, user_id="bob"),
        )
    )
    mine = await store.user_orders("alice")
    assert [o.order_id for o in mine] == ["group.o3", "sale.o2", "sale.o1"]
    assert [o.kind for o in mine] == [OrderKind.TEAM, OrderKind.FLASH, OrderKind.FLASH]
    assert mine[0].team_id == "group.t1"
    assert [o.order_id for o in await store.user_orders("alice", limit=2)] == [
        "group.o3",
        "sale.o2",
    ]
    assert await store.user_orders("nobody") == []


async def test_team_orders_oldest_first(store: Store) -> None:
    members = [
        order(n, campaign_id="group", user_id=f"u{n}", price=990, team_id="group.t1")
        for n in (12, 10, 11)
    ]
    other = order(13, campaign_id="group", price=990, team_id="group.t2")
    await store.apply(batch(*members, other))
    assert [o.order_id for o in await store.team_orders("group.t1")] == [
        "group.o10",
        "group.o11",
        "group.o12",
    ]
    assert await store.team_orders("group.t9") == []


async def test_order_and_team_totals(store: Store) -> None:
    await store.apply(
        batch(
            order(1, qty=2),
            order(2, qty=1),
            order(3, qty=2, state=OrderState.PAID, version=2),
            order(4, sku="sku-2", qty=3, price=500, state=OrderState.PAID, version=2),
            order(5, campaign_id="other", qty=9),
            teams=(
                team(1),
                team(2),
                team(3, state=TeamState.FAILED, why="expired"),
                team(4, state=TeamState.SUCCEEDED, paid=3),
            ),
        )
    )
    totals = sorted(await store.order_totals("sale"), key=lambda t: (t.sku, t.state))
    assert totals == [
        Totals("sku-1", "held", 2, 3, 3 * 1999),
        Totals("sku-1", "paid", 1, 2, 2 * 1999),
        Totals("sku-2", "paid", 1, 3, 1500),
    ]
    assert all(type(v) is int for t in totals for v in (t.orders, t.units, t.amount))
    assert await store.team_totals("group") == {"open": 2, "failed": 1, "succeeded": 1}
    assert await store.order_totals("nothing") == []
    assert await store.team_totals("nothing") == {}


async def test_team_fill_counts_teams_that_succeeded_automatically_apart(store: Store) -> None:
    """A team that succeeded automatically at expiry (why "auto", 2 of 3 seats paid) counts
    apart with the seat it lacked, and not in the mean time to fill."""
    filled = team(1, state=TeamState.SUCCEEDED, paid=3, version=4)  # opened at 6 s, filled 1004
    auto = team(2, state=TeamState.SUCCEEDED, paid=2, why="auto", version=9)
    await store.apply(batch(teams=(filled, auto, team(3), team(4, state=TeamState.PENDING))))
    assert await store.team_totals("group") == {"succeeded": 2, "open": 1, "pending": 1}
    assert await store.team_fill("group") == TeamFill(3, 1004_000 - 6_000, 1, 1)
    assert await store.team_fill("nothing") == TeamFill(0, None, 0, 0)


async def test_invalidation_is_recorded_once(store: Store) -> None:
    await store.insert_campaign(flash())
    await store.apply(batch(order(1), invalidations={"sale": ms(30), "ghost": ms(30)}))
    stored = await store.get_campaign("sale")
    assert stored is not None
    assert stored.invalidated_at == at(30)
    assert await store.get_order("sale.o1") == order(1)
    await store.apply(batch(invalidations={"sale": ms(90)}))  # replayed later: first one wins
    again = await store.get_campaign("sale")
    assert again is not None
    assert again.invalidated_at == at(30)


@pytest.mark.parametrize("kill", [False, True], ids=["fast", "immediate"])
async def test_postgres_outage_raises_unavailable_then_recovers(
    postgres_server: PostgresServer, pg_url: str, kill: bool
) -> None:
    store = await PostgresStore.open(pg_url)
    try:
        await store.insert_campaign(flash())
        postgres_server.stop(kill=kill)
        with pytest.raises(Unavailable) as caught:
            await store.get_campaign("sale")
        assert caught.value.__cause__ is not None
        with pytest.raises(Unavailable):
            await store.apply(batch(order(1)))
        postgres_server.start()
        assert await store.get_campaign("sale") == flash()
        await store.apply(batch(order(1)))
        assert await store.get_order("sale.o1") == order(1)
    finally:
        if not postgres_server.running:
            postgres_server.start()
        await store.close()


async def test_postgres_open_without_a_server_raises_unavailable() -> None:
    with pytest.raises(Unavailable):
        await PostgresStore.open(f"postgresql://flashteam@127.0.0.1:{free_port()}/flashteam")


async def test_postgres_open_of_a_missing_database_raises_unavailable(
    postgres_server: PostgresServer,
) -> None:
    with pytest.raises(Unavailable):
        await PostgresStore.open(postgres_server.url_for("no_such_database"))


async def test_an_id_held_for_another_shopper_is_never_overwritten(store: Store) -> None:
    """A Redis that lost state and handed an id out again: SQL keeps its own order and
    reports the collision; the marks record the highest sequence committed."""
    alice = order(1, state=OrderState.PAID, version=2, payment_ref="pay-1")
    assert await store.apply(batch(alice, order(2, user_id="carol"))) == []
    replayed = await store.apply(batch(order(1, version=1)))  # a replay is no collision
    assert replayed == []
    reissued = order(1, user_id="bob", version=3, state=OrderState.PAID, payment_ref="pay-9")
    assert await store.apply(batch(reissued, order(3))) == ["sale.o1"]
    assert await store.get_order("sale.o1") == alice
    assert (await store.get_order("sale.o3")) == order(3)
    assert await store.marks("sale") == (3, 0)
    assert await store.apply(batch(teams=(team(7),))) == []
    assert await store.marks("group") == (0, 7)


async def test_a_large_batch_keeps_the_version_gate_and_reports_collisions(store: Store) -> None:
    """A batch as large as a flush of a backlog (PostgreSQL COPies it through its staging
    tables; the second time, into tables its first commit emptied): new rows land, older
    versions are skipped, an id held for another shopper is left alone and reported, the same
    as a small batch."""
    size = 2 * _COPY_FROM
    paid = order(2, state=OrderState.PAID, version=3, payment_ref="pay-2")
    held_teams = tuple(team(n) for n in range(1, size + 1))
    assert await store.apply(batch(order(1), paid, teams=held_teams[:1])) == []
    for _ in range(2):
        large = batch(
            order(1, user_id="bob", version=2),  # sale.o1 is alice's
            order(2, version=2),  # older than the stored version 3
            *(order(n, user_id="carol") for n in range(3, size + 1)),
            teams=tuple(dataclasses.replace(t, paid=2, version=2) for t in held_teams),
        )
        assert await store.apply(large) == ["sale.o1"]
    assert await store.get_order("sale.o1") == order(1)
    assert await store.get_order("sale.o2") == paid
    assert await store.get_order(f"sale.o{size}") == order(size, user_id="carol")
    assert await store.get_team(f"group.t{size}") == dataclasses.replace(
        held_teams[-1], paid=2, version=2
    )
    assert await store.marks("sale") == (size, 0)


async def test_the_idempotency_record_fills_in_from_an_older_event(store: Store) -> None:
    """A payment committed before its order.reserved event: the record still lands."""
    await store.apply(batch(order(1, state=OrderState.PAID, version=2, payment_ref="p")))
    first = Batch()
    first.add_order(order(1), ms(1000), idem="ralice:key-1")
    await store.apply(first)
    (stored,) = await store.campaign_orders("sale")
    assert stored.idem == "ralice:key-1" and stored.order.state is OrderState.PAID


async def test_postgres_writers_of_the_same_rows_never_deadlock(pg_url: str) -> None:
    """Two transactions at once writing the same orders of two campaigns (and so both
    campaigns' marks), one batch listing them forwards and the other backwards, as a payment
    commit and a flush batch can: each write locks its rows by table and id, so one waits for
    the other and PostgreSQL never detects a deadlock."""
    stores = [await PostgresStore.open(pg_url) for _ in range(2)]
    before = await deadlocks(pg_url)
    try:
        for round_ in range(10):
            forward, backward = Batch(), Batch()
            ids = [(("sale", "other")[n % 2], n) for n in range(1, 201)]
            for campaign_id, n in ids:
                forward.add_order(order(n, campaign_id=campaign_id, version=2 * round_ + 1), 1)
            for campaign_id, n in reversed(ids):
                backward.add_order(order(n, campaign_id=campaign_id, version=2 * round_ + 2), 2)
            collisions = await asyncio.gather(stores[0].apply(forward), stores[1].apply(backward))
            assert list(collisions) == [[], []]
        assert await stores[0].marks("sale") == (200, 0)
        last = order(199, campaign_id="other", version=20)
        assert await stores[0].get_order("other.o199") == last
    finally:
        for store in stores:
            await store.close()  # a backend reports its statistics as it exits
    await asyncio.sleep(0.5)
    assert await deadlocks(pg_url) == before


async def test_a_sqlite_batch_outlives_a_caller_that_stopped_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds the file: a batch waits for it (tried again every millisecond
    or two), and when its caller gives up meanwhile (a payment's bounded wait) the batch is
    still written whole once the file is free, never left open holding the file; the next
    batch goes through, and a file held past the batch's own bound is Unavailable."""
    path = tmp_path / "held.db"
    store = await SqliteStore.open(path)
    try:
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.apply(batch(order(1))), 0.2)
            assert await store.get_order("sale.o1") is None
            holder.execute("COMMIT")
        finally:
            holder.close()
        await eventually(lambda: _has(store, "sale.o1"))
        await store.apply(batch(order(2)))
        assert await store.get_order("sale.o2") == order(2)
        with sqlite_file(path) as plain:
            assert plain.execute("SELECT COUNT(*) FROM orders").fetchone() == (2,)
        monkeypatch.setattr(sqlite_store, "_LOCKED_FOR", 0.3)
        with sqlite_file(path) as plain:
            plain.execute("BEGIN IMMEDIATE")  # the file's write lock, until the block ends
            with pytest.raises(Unavailable, match="stayed locked"):
                await store.apply(batch(order(3)))
        await store.apply(batch(order(3)))
        assert await store.get_order("sale.o3") == order(3)
    finally:
        await store.close()


async def _has(store: Store, order_id: str) -> bool:
    """the batch was committed once the file was free"""
    return await store.get_order(order_id) is not None


async def test_a_read_sees_every_commit_answered_before_it_began(backend: Backend) -> None:
    """Reads of one store run concurrently (the requests of one API worker) while another
    connection commits (the payment ledger, the flush worker): each read begun after a commit
    was answered sees it, however the concurrent reads interleave (a read left open on a
    shared SQLite connection would hold every other read to its older snapshot)."""
    reader, writer = await backend.open(), await backend.open()
    done = asyncio.Event()

    async def busy() -> None:
        while not done.is_set():
            await reader.order_totals("sale")

    try:
        background = [asyncio.create_task(busy()) for _ in range(16)]
        try:
            for n in range(1, 61):
                await writer.apply(batch(order(n, user_id=f"u{n}")))
                assert await reader.get_order(f"sale.o{n}") == order(n, user_id=f"u{n}"), n
        finally:
            done.set()
            await asyncio.gather(*background)
    finally:
        await reader.close()
        await writer.close()
