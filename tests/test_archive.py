"""Archival of finished campaigns out of Redis into SQL (engine/archive.py, docs/lifecycle.md).

A flash and a team campaign are run through every order and team state, end, are flushed and
archived. Every read (the HTTP JSON of the campaign, its stats, each order, each user's order
list, each team and its share view, each team's orders, the joinable list) is the same, field
by field, before and after; no key of the campaign is left in Redis. Writes after archival
answer as for an ended campaign, and an after-sale refund is applied once however often it is
sent at once. A campaign that does not compare clean is never archived, and a pass killed at
any step is finished by the next. On SQLite, PostgreSQL and the 3-master Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from engine import Engine, errors
from engine.api.app import Api
from engine.archive import ARCHIVING
from engine.keys import CAMPAIGN_SET, STREAM_SET, keys_of
from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisClusterServers, RedisServer
from engine.models import Campaign, OrderState
from engine.settings import Settings
from engine.stats import CampaignStats, RejectionCounter, campaign_stats
from engine.worker import FlushWorker
from testkit.factories import create_database, flash_campaign, make_settings, team_campaign
from testkit.helpers import age_order, age_team, eventually, reap, until

Json = Any
GW = {"Authorization": f"Bearer {TEST_GATEWAY_TOKEN}"}
AD = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
LASTS = 4.0  # seconds each campaign sells before it ends on its own
HOUR_MS = 3_600_000


@pytest.fixture(
    params=[
        pytest.param("sqlite"),
        pytest.param("postgres"),
        pytest.param("cluster", marks=pytest.mark.cluster),
    ]
)
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """An engine on the standalone Redis with SQLite or PostgreSQL, or on the Redis Cluster."""
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        urls = [server.url for server in cluster.servers]
        settings = make_settings(cluster.url, tmp_path, redis_cluster=True)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        urls = [server.url]
        settings = make_settings(server.url, tmp_path)
        if request.param == "postgres":
            pg: PostgresServer = request.getfixturevalue("postgres_server")
            settings = settings.with_(database_url=pg.url_for(await create_database(pg)))
    for url in urls:
        client = aioredis.Redis.from_url(url)
        await client.flushall()
        await client.aclose()
    async with await Engine.open(settings) as opened:
        yield opened


@asynccontextmanager
async def http(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API over this engine, in process."""
    settings = engine.runtime.settings.with_(
        gateway_token=TEST_GATEWAY_TOKEN, admin_token=TEST_ADMIN_TOKEN
    )
    transport = httpx.ASGITransport(app=Api(settings, engine).app)
    async with httpx.AsyncClient(transport=transport, base_url="http://flashteam") as client:
        yield client


@dataclass
class Sale:
    """What a finished flash and team sale left behind, for the reads to walk over."""

    campaigns: list[Campaign] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    teams: list[str] = field(default_factory=list)
    paid: dict[str, tuple[str, str]] = field(default_factory=dict)  # order -> user, payment ref
    auto_teams: list[str] = field(default_factory=list)  # succeeded automatically at expiry


async def _hold(engine: Engine, sale: Sale, cid: str, user: str, sku: str, qty: int = 1) -> str:
    held = await engine.flash.reserve(cid, user, sku, qty, f"k-{user}-{sku}")
    sale.orders.append(held.order.order_id)
    sale.users.add(user)
    return held.order.order_id


async def _pay(engine: Engine, sale: Sale, order_id: str, user: str) -> None:
    await engine.orders.pay(order_id, user, f"p-{order_id}")
    sale.paid[order_id] = (user, f"p-{order_id}")


async def _seat(engine: Engine, sale: Sale, user: str, how: str, where: str) -> tuple[str, str]:
    """A team seat: ``open`` a team of campaign ``where``, ``join`` team ``where``, or
    ``quick`` join in campaign ``where``; (order id, team id)."""
    if how == "open":
        seat = await engine.teams.open(where, user, "sku-1", 1, f"o-{user}")
    elif how == "join":
        seat = await engine.teams.join(where, user, f"j-{user}")
    else:
        seat = await engine.teams.quick_join(where, user, "sku-1", f"q-{user}")
    sale.orders.append(seat.order.order_id)
    sale.users.add(user)
    if seat.team.team_id not in sale.teams:
        sale.teams.append(seat.team.team_id)
    return seat.order.order_id, seat.team.team_id


async def run_flash(engine: Engine, sale: Sale, cid: str) -> Campaign:
    """Paid, refunded with and without restock, cancelled, expired orders; one item sold out;
    rejections counted."""
    now = await engine.runtime.now()
    campaign = flash_campaign(now, cid, stock=5, limit=2, skus=("sku-1", "sku-2"), lasts=LASTS)
    await engine.campaigns.create(campaign)
    sale.campaigns.append(campaign)
    await _pay(engine, sale, await _hold(engine, sale, cid, "u1", "sku-1"), "u1")
    for user, restock in (("u2", True), ("u3", False)):
        order = await _hold(engine, sale, cid, user, "sku-1")
        await _pay(engine, sale, order, user)
        await engine.orders.refund(order, restock=restock)
    await engine.orders.cancel(await _hold(engine, sale, cid, "u4", "sku-1"), "u4")
    await age_order(engine, await _hold(engine, sale, cid, "u5", "sku-1"), HOUR_MS)
    for user, qty in (("u6", 2), ("u7", 2), ("u8", 1)):
        await _pay(engine, sale, await _hold(engine, sale, cid, user, "sku-2", qty), user)
    with pytest.raises(errors.SoldOut):
        await engine.flash.reserve(cid, "u9", "sku-2", 1, "k-u9")
    counter = RejectionCounter(engine.runtime)
    for code in ("sold_out", "sold_out", "limit_exceeded"):
        counter.count(cid, code)
    await counter.flush()
    return campaign


async def run_teams(engine: Engine, sale: Sale, cid: str) -> Campaign:
    """Teams that succeed (one member refunded after), fail (a paid and a held seat; a
    cancelled seat), dissolve (the leader never paid, a quick-joiner's new team)."""
    now = await engine.runtime.now()
    campaign = team_campaign(now, cid, stock=20, limit=1, team_size=2, lasts=LASTS)
    await engine.campaigns.create(campaign)
    sale.campaigns.append(campaign)
    a1, team_a = await _seat(engine, sale, "a1", "open", cid)
    await _pay(engine, sale, a1, "a1")
    a2, _ = await _seat(engine, sale, "a2", "join", team_a)
    await _pay(engine, sale, a2, "a2")
    await engine.orders.refund(a2, restock=False)
    b1, team_b = await _seat(engine, sale, "b1", "open", cid)
    await _pay(engine, sale, b1, "b1")
    await _seat(engine, sale, "b2", "join", team_b)
    await age_team(engine, team_b, HOUR_MS)
    c1, _ = await _seat(engine, sale, "c1", "open", cid)
    await age_order(engine, c1, HOUR_MS)
    d1, team_d = await _seat(engine, sale, "d1", "open", cid)
    await _pay(engine, sale, d1, "d1")
    d2, _ = await _seat(engine, sale, "d2", "join", team_d)
    await engine.orders.cancel(d2, "d2")
    await age_team(engine, team_d, HOUR_MS)
    q1, _ = await _seat(engine, sale, "q1", "quick", cid)
    await age_order(engine, q1, HOUR_MS)
    return campaign


async def run_invalidated(engine: Engine, sale: Sale, cid: str) -> Campaign:
    """A team campaign the merchant invalidates while a team is open: its paid seat is
    refunded, its held seat cancelled; its share page says so."""
    now = await engine.runtime.now()
    campaign = team_campaign(now, cid, stock=20, limit=1, team_size=3)
    await engine.campaigns.create(campaign)
    sale.campaigns.append(campaign)
    v1, team = await _seat(engine, sale, "v1", "open", cid)
    await _pay(engine, sale, v1, "v1")
    await _seat(engine, sale, "v2", "join", team)
    await engine.campaigns.invalidate(cid)
    return campaign


async def run_deals(engine: Engine, sale: Sale, cid: str) -> Campaign:
    """A team campaign with the team deal options (automatic success from 2 paid seats of
    3, a leader price, 1 unit per order): a team whose time runs out with 2 paid seats and a
    held one (it succeeds automatically when reaped), one with its leader alone (it fails)."""
    now = await engine.runtime.now()
    campaign = team_campaign(
        now,
        cid,
        stock=20,
        limit=1,
        team_size=3,
        lasts=LASTS,
        per_order_limit=1,
        auto_success_min_paid=2,
        leader_price=490,
    )
    await engine.campaigns.create(campaign)
    sale.campaigns.append(campaign)
    e1, team_e = await _seat(engine, sale, "e1", "open", cid)
    await _pay(engine, sale, e1, "e1")
    e2, _ = await _seat(engine, sale, "e2", "join", team_e)
    await _pay(engine, sale, e2, "e2")
    await _seat(engine, sale, "e3", "join", team_e)
    await age_team(engine, team_e, HOUR_MS)
    sale.auto_teams.append(team_e)
    f1, team_f = await _seat(engine, sale, "f1", "open", cid)
    await _pay(engine, sale, f1, "f1")
    await age_team(engine, team_f, HOUR_MS)
    return campaign


async def finished_sale(engine: Engine) -> Sale:
    """The four sales run, ended (or invalidated), reaped and flushed."""
    sale = Sale()
    await run_flash(engine, sale, "arch-flash")
    await run_teams(engine, sale, "arch-team")
    await run_invalidated(engine, sale, "arch-void")
    await run_deals(engine, sale, "arch-deal")
    ended = max(c.ends_at for c in sale.campaigns if c.id != "arch-void")
    await until(engine.runtime.now, ended, within=30)
    await engine.reaper.run_once()
    await FlushWorker(engine.runtime).drain()
    return sale


async def reads(engine: Engine, sale: Sale) -> dict[str, Json]:
    """Every read of the sale over HTTP: path -> (status, JSON body)."""
    paths = []
    for campaign in sale.campaigns:
        cid = campaign.id
        paths += [f"/v1/campaigns/{cid}", f"/v1/campaigns/{cid}/stats"]
        paths += [f"/v1/campaigns/{cid}/teams?sku=sku-1&viewer=zed"]
    paths += [f"/v1/orders/{order_id}" for order_id in sale.orders]
    paths += [f"/v1/users/{user}/orders" for user in sorted(sale.users)]
    for team_id in sale.teams:
        paths += [f"/v1/teams/{team_id}", f"/v1/teams/{team_id}/orders"]
        paths += [f"/v1/teams/{team_id}?viewer={user}" for user in ("a1", "b2", "zed")]
    out: dict[str, Json] = {}
    async with http(engine) as client:
        for path in paths:
            answer = await client.get(path, headers=AD)
            out[path] = (answer.status_code, answer.json())
    return out


async def campaign_keys(engine: Engine, campaign_id: str) -> list[str]:
    """Every key of the campaign's hash tag left in Redis (on its node of a cluster)."""
    redis: Any = engine.runtime.redis
    pattern = f"ft:{{c:{campaign_id}}}*"
    if hasattr(redis, "get_node_from_key"):
        node = redis.get_node_from_key(keys_of(campaign_id).meta)
        return sorted(await redis.keys(pattern, target_nodes=node))
    return sorted([key async for key in redis.scan_iter(match=pattern)])


async def test_every_read_is_the_same_after_archival_and_redis_keeps_nothing(
    engine: Engine,
) -> None:
    sale = await finished_sale(engine)
    before = await reads(engine, sale)
    assert all(status == 200 for status, _ in before.values()), before
    stats = before["/v1/campaigns/arch-flash/stats"][1]
    assert stats["rejections"] == {"limit_exceeded": 1, "sold_out": 2}
    assert any(item["time_to_sell_out_s"] is not None for item in stats["items"])
    team_states = {before[f"/v1/teams/{t}"][1]["team"]["state"] for t in sale.teams}
    assert team_states == {"succeeded", "failed", "dissolved"}
    share_states = {before[f"/v1/teams/{t}"][1]["share_state"] for t in sale.teams}
    assert "campaign_invalidated" in share_states
    assert before["/v1/campaigns/arch-void"][1]["status"] == "invalidated"
    order_states = {before[f"/v1/orders/{o}"][1]["state"] for o in sale.orders}
    assert order_states == {s.value for s in OrderState} - {"held"}
    (auto_team,) = sale.auto_teams
    view = before[f"/v1/teams/{auto_team}?viewer=zed"][1]
    assert (view["share_state"], view["auto_succeeded"], view["team"]["paid"]) == (
        "succeeded",
        True,
        2,
    )
    deal = before["/v1/campaigns/arch-deal/stats"][1]
    assert (deal["teams"]["auto_succeeded"], deal["teams"]["failed"]) == (1, 1)
    assert deal["items"][0]["gmv"] == 490 + 990
    definition = before["/v1/campaigns/arch-deal"][1]
    assert (definition["per_order_limit"], definition["auto_success_min_paid"]) == (1, 2)
    assert definition["items"][0]["leader_price"] == 490

    for campaign in sale.campaigns:
        done = await engine.archiver.archive(campaign.id)
        assert done.archived, (done.reason, done.differences)
        assert await campaign_keys(engine, campaign.id) == []
        assert await engine.runtime.store.archive_of(campaign.id) is not None
    redis = engine.runtime.redis
    for key in (CAMPAIGN_SET, STREAM_SET, ARCHIVING):
        assert not set(await redis.smembers(key)) & {c.id for c in sale.campaigns}

    after = await reads(engine, sale)
    for path, answer in before.items():
        assert after[path] == answer, path


async def test_writes_after_archival_answer_as_for_an_ended_campaign(engine: Engine) -> None:
    sale = await finished_sale(engine)
    flash, team = (c.id for c in sale.campaigns[:2])
    paid_order = next(o for o, (u, _) in sale.paid.items() if u == "u1")
    expired = await engine.orders.get("arch-flash.o5")
    assert expired.state is OrderState.EXPIRED and expired.user_id == "u5"
    ended_answers = await write_answers(engine, flash, team, paid_order)
    codes = {code for _, _, code, _, _ in ended_answers}
    assert codes == {
        "ended",
        "team_closed",
        "not_found",  # the unknown team
        "order_not_found",
        "invalidated",
        "forbidden",
        "hold_expired",
        "invalid_state",  # also a join in a flash campaign (the wrong kind)
        "not_editable",
        None,  # the retried payment and refund
    }, ended_answers

    for campaign in sale.campaigns:
        assert (await engine.archiver.archive(campaign.id)).archived
    assert await write_answers(engine, flash, team, paid_order) == ended_answers
    assert await campaign_keys(engine, flash) == [] == await campaign_keys(engine, team)


async def write_answers(engine: Engine, flash: str, team: str, paid: str) -> list[Json]:
    """Each write's answer (status, error code or state) on the finished sale; none of them
    may recreate a key of an archived campaign."""
    calls: list[tuple[str, str, Json]] = [
        (
            "POST",
            f"/v1/campaigns/{flash}/orders",
            {"user_id": "n1", "sku": "sku-1", "qty": 1, "idempotency_key": "late"},
        ),
        (
            "POST",
            f"/v1/campaigns/{team}/teams",
            {"user_id": "n2", "sku": "sku-1", "idempotency_key": "late"},
        ),
        (
            "POST",
            f"/v1/campaigns/{team}/teams/quick-join",
            {"user_id": "n3", "sku": "sku-1", "idempotency_key": "late"},
        ),
        ("POST", f"/v1/teams/{team}.t1/join", {"user_id": "n4", "idempotency_key": "late"}),
        ("POST", f"/v1/teams/{team}.t999/join", {"user_id": "n4", "idempotency_key": "late"}),
        (
            "POST",
            "/v1/campaigns/arch-void/teams/quick-join",
            {"user_id": "n3", "sku": "sku-1", "idempotency_key": "late"},
        ),
        ("POST", f"/v1/teams/{flash}.t1/join", {"user_id": "n4", "idempotency_key": "late"}),
        ("POST", f"/v1/orders/{paid}/pay", {"user_id": "u1", "payment_ref": f"p-{paid}"}),
        ("POST", f"/v1/orders/{paid}/pay", {"user_id": "u1", "payment_ref": "another"}),
        ("POST", f"/v1/orders/{paid}/pay", {"user_id": "u2", "payment_ref": f"p-{paid}"}),
        ("POST", f"/v1/orders/{flash}.o5/pay", {"user_id": "u5", "payment_ref": "late"}),
        ("POST", f"/v1/orders/{flash}.o4/cancel", {"user_id": "u4"}),
        ("POST", f"/v1/orders/{flash}.o1/cancel", {"user_id": "u1"}),
        ("POST", f"/v1/orders/{flash}.o999/cancel", {"user_id": "u1"}),
        ("POST", f"/v1/orders/{flash}.o4/refund", {"restock": True}),
        ("POST", f"/v1/orders/{flash}.o2/refund", {"restock": True}),
        ("POST", f"/v1/campaigns/{flash}/invalidate", {}),
    ]
    answers = []
    async with http(engine) as client:
        for method, path, body in calls:
            answer = await client.request(method, path, json=body, headers=AD)
            payload = answer.json()
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            detail = error.get("state") or error.get("reason")
            answers.append(
                (
                    path,
                    answer.status_code,
                    error.get("code"),
                    detail,
                    payload.get("state") if "error" not in payload else None,
                )
            )
    return answers


async def test_a_refund_of_an_archived_order_sent_twice_at_once_refunds_once(
    engine: Engine,
) -> None:
    sale = await finished_sale(engine)
    flash = sale.campaigns[0].id
    assert (await engine.archiver.archive(flash)).archived
    order_id = next(o for o, (u, _) in sale.paid.items() if u == "u6")  # 2 units of sku-2
    before = await engine.orders.get(order_id)
    stock_before = {s.sku: s for s in (await engine.campaigns.get(flash)).stock}
    gmv_before = {i.sku: i.gmv for i in (await engine_stats(engine, flash)).items}

    async with http(engine) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"/v1/orders/{order_id}/refund", json={"restock": False}, headers=AD)
                for _ in range(2)
            )
        )
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert {a.json()["version"] for a in answers} == {before.version + 1}
    after = await engine.orders.get(order_id)
    assert (after.state, after.version) == (OrderState.REFUNDED, before.version + 1)
    stock = {s.sku: s for s in (await engine.campaigns.get(flash)).stock}
    assert (stock["sku-2"].paid, stock["sku-2"].gone) == (
        stock_before["sku-2"].paid - 2,
        stock_before["sku-2"].gone + 2,
    )
    assert stock["sku-1"] == stock_before["sku-1"]
    gmv = {i.sku: i.gmv for i in (await engine_stats(engine, flash)).items}
    assert gmv["sku-2"] == gmv_before["sku-2"] - before.amount
    # A third one is the same answer and changes nothing.
    again = await engine.orders.refund(order_id, restock=True)
    assert (again.state, again.version) == (OrderState.REFUNDED, before.version + 1)
    assert await campaign_keys(engine, flash) == []


async def engine_stats(engine: Engine, campaign_id: str) -> CampaignStats:
    return await campaign_stats(engine.runtime, await engine.campaigns.get(campaign_id))


async def swap_users_in_sql(engine: Engine, first: str, second: str) -> None:
    """Swap two orders' users in SQL, leaving every total equal (a planted difference)."""
    store: Any = engine.runtime.store
    a, b = await store.get_order(first), await store.get_order(second)
    statement = "UPDATE orders SET user_id = {0} WHERE order_id = {1}"
    for user, order_id in ((b.user_id, first), (a.user_id, second)):
        if hasattr(store, "_pool"):
            await store._pool.execute(statement.format("$1", "$2"), user, order_id)
        else:
            await store._db.execute(statement.format("?", "?"), (user, order_id))


async def test_a_campaign_that_does_not_compare_clean_is_never_archived(engine: Engine) -> None:
    sale = await finished_sale(engine)
    flash = sale.campaigns[0].id
    keys = await campaign_keys(engine, flash)
    await swap_users_in_sql(engine, f"{flash}.o1", f"{flash}.o2")
    done = await engine.archiver.archive(flash)
    assert (done.archived, done.reason) == (False, "differs")
    assert any("user: redis u1 sql u2" in line for line in done.differences), done.differences
    # Unsealed, untouched: Redis still holds and serves it.
    assert await campaign_keys(engine, flash) == keys
    assert await engine.runtime.store.archive_of(flash) is None
    await swap_users_in_sql(engine, f"{flash}.o1", f"{flash}.o2")  # SQL right again
    refunded = await engine.orders.refund(f"{flash}.o1", restock=False)  # live in Redis
    assert refunded.state is OrderState.REFUNDED and refunded.user_id == "u1"
    await FlushWorker(engine.runtime).drain()

    # A stock bucket off by one unit (every record equal) is a difference too.
    redis: Any = engine.runtime.redis
    await redis.hincrby(keys_of(flash).inv, "a:sku-1", 1)
    done = await engine.archiver.archive(flash)
    assert (done.archived, done.reason) == (False, "differs")
    assert done.differences == ("stock sku-1 available: redis 4 sql 3",)
    await redis.hincrby(keys_of(flash).inv, "a:sku-1", -1)
    assert (await engine.archiver.archive(flash)).archived
    counted = await redis.hgetall("ft:archive")
    assert (counted["refused:differs"], counted["archived"]) == ("2", "1")


async def test_a_live_campaign_held_orders_open_teams_and_an_unflushed_outbox_stay(
    engine: Engine,
) -> None:
    now = await engine.runtime.now()
    live = flash_campaign(now, "live", stock=10)
    await engine.campaigns.create(live)
    held = await engine.flash.reserve("live", "u1", "sku-1", 1, "k")
    assert (await engine.archiver.archive("live")).reason == "live"
    over = team_campaign(now, "over", stock=10, limit=1, team_size=2, lasts=2)
    await engine.campaigns.create(over)
    seat = await engine.teams.open("over", "t1", "sku-1", 1, "k")
    await engine.orders.pay(seat.order.order_id, "t1", f"p-{seat.order.order_id}")
    short = flash_campaign(now, "short", stock=10, lasts=2)
    await engine.campaigns.create(short)
    hold = await engine.flash.reserve("short", "u1", "sku-1", 1, "k")
    await until(engine.runtime.now, max(over.ends_at, short.ends_at))
    assert (await engine.archiver.archive("over")).reason == "teams"
    assert (await engine.archiver.archive("short")).reason == "holds"
    await engine.orders.cancel(hold.order.order_id, "u1")
    assert (await engine.archiver.archive("short")).reason == "unflushed"
    await FlushWorker(engine.runtime).drain()
    assert (await engine.archiver.archive("short")).archived
    assert held.order.state is OrderState.HELD  # the live campaign was never touched
    assert (await engine.orders.get(held.order.order_id)).state is OrderState.HELD


async def test_the_reaper_archives_after_the_grace_period(engine: Engine, tmp_path: Path) -> None:
    sale = await finished_sale(engine)
    # Within the grace period (the default hour) no campaign is due.
    assert (await engine.archiver.run_once()).archived == []
    settings = engine.runtime.settings.with_(archive_after=0.0, archive_interval=0.1)
    async with await Engine.open(settings) as eager:
        stop = asyncio.Event()
        reaper = asyncio.create_task(eager.reaper.run(stop))

        async def archived() -> bool:
            store = eager.runtime.store
            return all([await store.archive_of(c.id) is not None for c in sale.campaigns])

        await eventually(archived, 30, what="the reaper to archive both campaigns")
        stop.set()
        await reaper
    for campaign in sale.campaigns:
        assert await campaign_keys(engine, campaign.id) == []
    # A second pass finds nothing to do.
    assert (await engine.archiver.run_once()).archived == []


def node_clients(engine: Engine) -> list[aioredis.Redis]:
    """A client of each Redis server the engine uses (every master of a cluster)."""
    redis: Any = engine.runtime.redis
    if hasattr(redis, "get_nodes"):
        return [aioredis.Redis(host=n.host, port=n.port) for n in redis.get_nodes()]
    url = engine.runtime.settings.redis_url
    assert url is not None
    return [aioredis.Redis.from_url(url)]


# Where the archival of one campaign is killed: right after each of these lines of its log
# (`flashteam -v archive`), before its next write to Redis.
KILL_AFTER = (
    "seal: sealed",
    "Redis and SQL agree",
    "recorded as archived in SQL",
    "unregistered",
    ":orders",  # an early key deleted
    ":idem",  # the last key but the definition
    ":meta",  # every key deleted, ft:archiving not yet cleared
)


async def kill_archival_after(
    engine: Engine, campaign_id: str, marker: str, servers: list[aioredis.Redis]
) -> None:
    """Run `flashteam -v archive <campaign>` and SIGKILL it once its log shows ``marker``:
    its Redis writes are paused the moment the line is read, so it dies before the next.
    Before the SQL commit ("recorded as archived in SQL") no archive record can be written
    from the start (``sql_writes_held``), so however late the line is read, the kill lands
    before the commit."""
    env = {**os.environ, **engine.runtime.settings.to_env()}
    before_commit = KILL_AFTER.index(marker) < KILL_AFTER.index("recorded as archived in SQL")
    async with sql_writes_held(engine.runtime.settings, before_commit):
        await _kill_after(campaign_id, marker, env, servers)


@asynccontextmanager
async def sql_writes_held(settings: Settings, held: bool) -> AsyncIterator[None]:
    """While the block runs (when ``held``), nobody else writes an archive record: SQLite's
    write lock, or PostgreSQL's EXCLUSIVE lock on the archives table, is held; reads go on."""
    if not held:
        yield
    elif settings.database_url is not None and settings.database_url.startswith("postgres"):
        conn: Any = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE archives IN EXCLUSIVE MODE")
                yield
        finally:
            await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(settings.sqlite_path, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                db.execute("ROLLBACK")


async def _kill_after(
    campaign_id: str, marker: str, env: dict[str, str], servers: list[aioredis.Redis]
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "-v", "archive", campaign_id,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    seen = []
    try:
        async with asyncio.timeout(60):
            while line := (await process.stderr.readline()).decode():
                seen.append(line)
                if campaign_id in line and marker in line:
                    for server in servers:
                        await server.client_pause(10_000, all=False)
                    process.send_signal(signal.SIGKILL)
                    break
            else:
                raise AssertionError(f"{marker!r} never logged:\n{''.join(seen)}")
        assert await process.wait() == -signal.SIGKILL
    finally:
        await reap(process)
        for server in servers:
            await server.client_unpause()


async def test_an_archival_killed_at_any_step_is_finished_by_the_next_pass(
    engine: Engine,
) -> None:
    sale = Sale()
    ids = [f"kill-{n}" for n in range(len(KILL_AFTER))]
    for campaign_id in ids:
        await run_flash(engine, sale, campaign_id)
    await until(engine.runtime.now, max(c.ends_at for c in sale.campaigns), within=30)
    await engine.reaper.run_once()
    await FlushWorker(engine.runtime).drain()
    store = engine.runtime.store
    before = {c: await store.campaign_orders(c) for c in ids}
    reads_before = await reads(engine, sale)
    redis: Any = engine.runtime.redis
    servers = node_clients(engine)
    try:
        for campaign_id, marker in zip(ids, KILL_AFTER, strict=True):
            await kill_archival_after(engine, campaign_id, marker, servers)
            # The dead process's lock would expire within a minute: let it expire now.
            await redis.pexpire("ft:archiver", 1)
    finally:
        for server in servers:
            await server.aclose()
    committed = {c for c in ids if await store.archive_of(c) is not None}
    assert 0 < len(committed) < len(ids), "the kills fell before and after the commit"
    resumable = set(await redis.smembers(ARCHIVING))  # some noted before their commit
    # Killed once every step was done (the last log line came a moment before the end).
    finished = {c for c in committed - resumable if not await campaign_keys(engine, c)}

    # The next pass: every one archived, nothing lost or duplicated.
    nxt = await Engine.open(engine.runtime.settings.with_(archive_after=0.0))
    async with nxt:
        done = await nxt.archiver.run_once()
    assert set(done.archived) == set(ids) - finished, done.refused
    for campaign_id in ids:
        assert await campaign_keys(engine, campaign_id) == []
        assert await store.campaign_orders(campaign_id) == before[campaign_id]
    assert not await redis.smembers(ARCHIVING)
    assert await reads(engine, sale) == reads_before
