"""Contract tests of the team-join (group-buy) paths through the engine API (docs/lifecycle.md,
docs/invariants.md).

Each test drives one outcome of a team script (lua/open_team.lua, join_team.lua,
quick_join.lua, expire_teams.lua, list_teams.lua and the team branches of pay_order.lua,
cancel_order.lua, refund_order.lua, expire_orders.lua) through ``engine.teams``,
``engine.flash`` or ``engine.reaper`` and checks the typed result, the team record, the stock
buckets, the joinable list, the outbox stream and the invariant audit. Time is moved with
``age_order`` / ``age_team``; only the campaign-end test waits for the Redis clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine import (
    AlreadyInTeam,
    Campaign,
    Ended,
    Engine,
    HoldExpired,
    IdempotencyMismatch,
    Invalidated,
    InvalidState,
    ItemStock,
    LimitExceeded,
    NotFound,
    NotStarted,
    Order,
    OrderKind,
    OrderState,
    RateLimited,
    SoldOut,
    TeamClosed,
    TeamFull,
    TeamInProgress,
    ValidationError,
)
from engine.events import Event
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import Seat, Team, TeamSeatResult, TeamState, to_ms
from engine.teams import ShareState, mask_user
from testkit.factories import flash_campaign, make_settings, team_campaign
from testkit.helpers import age_order, age_team, assert_invariants, early_in_a_second, until

CID = "group"
SKU = "sku-1"
PRICE = 990
HOLD = timedelta(seconds=60)
TTL = timedelta(seconds=600)
HOLD_MS = 60_000
TTL_MS = 600_000
KEYS = keys_of(CID)

Entry = dict[str, str]


# --------------------------------------------------------------------------- helpers


async def start(engine: Engine, campaign_id: str = CID, **options: Any) -> Campaign:
    """Create an active team campaign (size 3, 60 s holds, 600 s team ttl, stock 100)."""
    campaign = team_campaign(await engine.runtime.now(), campaign_id, **options)
    return (await engine.campaigns.create(campaign)).campaign


async def open_team(
    engine: Engine, leader: str = "leader", qty: int = 1, sku: str = SKU
) -> TeamSeatResult:
    result = await engine.teams.open(CID, leader, sku, qty, f"open-{leader}-{sku}-{qty}")
    assert not result.replayed
    return result


async def pay(engine: Engine, order: Order) -> Order:
    return await engine.orders.pay(order.order_id, order.user_id, f"pay-{order.order_id}")


async def open_paid_team(engine: Engine, leader: str = "leader", sku: str = SKU) -> Team:
    """A team whose leader paid: open, joinable, its clock running."""
    opened = await open_team(engine, leader, sku=sku)
    await pay(engine, opened.order)
    return await engine.teams.get(opened.team.team_id)


async def open_paid_team_of(engine: Engine, leader: str, qty: int) -> Team:
    opened = await open_team(engine, leader, qty=qty)
    await pay(engine, opened.order)
    return await engine.teams.get(opened.team.team_id)


async def join(engine: Engine, team_id: str, user: str) -> Order:
    result = await engine.teams.join(team_id, user, f"join-{user}-{team_id}")
    assert not result.replayed and not result.opened
    return result.order


async def stock_of(engine: Engine, sku: str = SKU) -> ItemStock:
    view = await engine.campaigns.get(CID)
    return next(item for item in view.stock if item.sku == sku)


async def abc(engine: Engine, sku: str = SKU) -> tuple[int, int, int]:
    """(available, held, paid) units of the item."""
    stock = await stock_of(engine, sku)
    return stock.available, stock.held, stock.paid


async def units_of(engine: Engine, user: str) -> int:
    return int(await engine.runtime.redis.hget(KEYS.users, user) or 0)


async def events(engine: Engine) -> list[Entry]:
    entries: Any = await engine.runtime.redis.xrange(KEYS.events)
    return [dict(fields) for _, fields in entries]


async def team_events(engine: Engine, team_id: str) -> list[Entry]:
    return [e for e in await events(engine) if e.get("team") == team_id]


async def order_events(engine: Engine, order_id: str, kind: str | None = None) -> list[Entry]:
    """The order.* events of one order (of one type, if given), oldest first."""
    return [
        e
        for e in await events(engine)
        if e["type"].startswith("order.")
        and e.get("order") == order_id
        and (kind is None or e["type"] == kind)
    ]


async def joinable_ids(engine: Engine, viewer: str | None = None, limit: int = 20) -> list[str]:
    return [team.team_id for team in await engine.teams.joinable(CID, SKU, viewer, limit)]


# --------------------------------------------------------------------------- open_team


async def test_open_team_is_pending_with_the_leaders_seat_held(engine: Engine) -> None:
    await start(engine, limit=3)
    before = await engine.runtime.now()
    result = await open_team(engine, "leader", qty=2)
    after = await engine.runtime.now()

    assert result.opened and not result.replayed
    order, team = result.order, result.team
    assert order.order_id.startswith(f"{CID}.o")
    assert (order.user_id, order.sku, order.qty, order.amount) == ("leader", SKU, 2, 2 * PRICE)
    assert order.state is OrderState.HELD
    assert order.kind is OrderKind.TEAM
    assert order.team_id == team.team_id
    assert before <= order.created_at <= after
    assert order.expires_at == order.created_at + HOLD

    assert team.team_id.startswith(f"{CID}.t")
    assert team.state is TeamState.PENDING
    assert (team.leader_id, team.sku, team.qty, team.size) == ("leader", SKU, 2, 3)
    assert (team.opened_at, team.expires_at, team.why) == (None, None, None)
    assert (team.held, team.paid, team.remaining) == (1, 0, 2)
    assert team.seats == (Seat(order.order_id, "leader"),)
    assert await engine.teams.get(team.team_id) == team
    assert await engine.orders.get(order.order_id) == order

    assert await abc(engine) == (98, 2, 0)
    assert await units_of(engine, "leader") == 2
    assert await engine.runtime.redis.zscore(KEYS.deadlines, order.order_id) == to_ms(
        order.expires_at
    )
    (created,) = await team_events(engine, team.team_id)
    assert created["type"] == "team.created"
    assert Team.from_record(team.team_id, created["record"]) == team
    await assert_invariants(engine, CID)


async def test_pending_team_is_not_joinable(engine: Engine) -> None:
    await start(engine)
    team = (await open_team(engine, "leader")).team

    with pytest.raises(TeamClosed) as caught:
        await engine.teams.join(team.team_id, "friend", "k1")
    assert caught.value.details == {"team_state": "pending"}
    assert caught.value.code == "team_closed"
    assert await joinable_ids(engine) == []
    # quick_join does not seat anyone in a pending team: it opens a team of its own.
    quick = await engine.teams.quick_join(CID, "friend", SKU, "q1")
    assert quick.opened and quick.team.team_id != team.team_id
    assert (await engine.teams.get(team.team_id)).seats == team.seats
    assert await abc(engine) == (98, 2, 0)
    await assert_invariants(engine, CID)


async def test_open_team_before_the_start_is_not_started(engine: Engine) -> None:
    campaign = await start(engine, starts_in=3600)
    with pytest.raises(NotStarted) as caught:
        await engine.teams.open(CID, "leader", SKU, 1, "k1")
    assert caught.value.details == {"starts_at": campaign.starts_at}
    with pytest.raises(NotStarted):
        await engine.teams.quick_join(CID, "leader", SKU, "k2")
    assert await abc(engine) == (100, 0, 0)
    assert await engine.runtime.redis.hlen(KEYS.teams) == 0
    assert await events(engine) == []
    await assert_invariants(engine, CID)


async def test_open_team_on_an_invalidated_campaign_is_rejected(engine: Engine) -> None:
    await start(engine)
    await engine.campaigns.invalidate(CID)
    with pytest.raises(Invalidated):
        await engine.teams.open(CID, "leader", SKU, 1, "k1")
    with pytest.raises(Invalidated):
        await engine.teams.quick_join(CID, "leader", SKU, "k2")
    assert await abc(engine) == (100, 0, 0)
    assert await engine.runtime.redis.hlen(KEYS.teams) == 0
    await assert_invariants(engine, CID)


async def test_team_paths_on_a_flash_campaign_are_invalid_state(engine: Engine) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), "sale"))
    with pytest.raises(InvalidState):
        await engine.teams.open("sale", "leader", "sku-1", 1, "k1")
    with pytest.raises(InvalidState):
        await engine.teams.quick_join("sale", "leader", "sku-1", "k2")
    with pytest.raises(InvalidState):
        await engine.teams.join("sale.t1", "leader", "k3")
    assert await engine.runtime.redis.hlen(keys_of("sale").orders) == 0
    assert await engine.runtime.redis.hlen(keys_of("sale").teams) == 0
    await assert_invariants(engine, "sale")


async def test_open_team_for_an_unknown_sku_is_not_found(engine: Engine) -> None:
    await start(engine)
    with pytest.raises(NotFound) as caught:
        await engine.teams.open(CID, "leader", "no-such-sku", 1, "k1")
    assert caught.value.details == {"sku": "no-such-sku"}
    with pytest.raises(NotFound) as quick:
        await engine.teams.quick_join(CID, "leader", "no-such-sku", "k2")
    assert quick.value.details == {"sku": "no-such-sku"}
    with pytest.raises(NotFound):
        await engine.teams.open("nope", "leader", SKU, 1, "k3")
    assert await engine.runtime.redis.hlen(KEYS.teams) == 0
    assert await units_of(engine, "leader") == 0
    await assert_invariants(engine, CID)


async def test_open_team_over_the_per_user_limit_is_rejected(engine: Engine) -> None:
    await start(engine, limit=2)
    with pytest.raises(LimitExceeded) as caught:
        await engine.teams.open(CID, "leader", SKU, 3, "k1")
    assert caught.value.details == {"units_left": 2}
    await open_team(engine, "leader", qty=2)
    with pytest.raises(LimitExceeded) as again:
        await engine.teams.open(CID, "leader", SKU, 1, "k2")
    assert again.value.details == {"units_left": 0}
    assert await engine.runtime.redis.hlen(KEYS.teams) == 1
    assert await units_of(engine, "leader") == 2
    await assert_invariants(engine, CID)


async def test_open_team_beyond_the_stock_is_sold_out(engine: Engine) -> None:
    await start(engine, stock=1, limit=5)
    with pytest.raises(SoldOut) as caught:
        await engine.teams.open(CID, "leader", SKU, 2, "k1")
    assert caught.value.details == {"available": 1}
    await open_team(engine, "leader", qty=1)
    with pytest.raises(SoldOut) as gone:
        await engine.teams.open(CID, "other", SKU, 1, "k1")
    assert gone.value.details == {"available": 0}
    assert await engine.runtime.redis.hlen(KEYS.teams) == 1
    assert await abc(engine) == (0, 1, 0)
    await assert_invariants(engine, CID)


async def test_open_team_retry_returns_the_same_team_and_a_reused_key_mismatches(
    engine: Engine,
) -> None:
    await start(engine, limit=5)
    first = await engine.teams.open(CID, "leader", SKU, 1, "k1")
    retry = await engine.teams.open(CID, "leader", SKU, 1, "k1")
    assert retry.replayed and retry.opened
    assert retry.order == first.order
    assert retry.team == first.team
    assert await engine.runtime.redis.hlen(KEYS.teams) == 1
    assert await abc(engine) == (99, 1, 0)

    with pytest.raises(IdempotencyMismatch):
        await engine.teams.open(CID, "leader", SKU, 2, "k1")
    with pytest.raises(IdempotencyMismatch):
        await engine.teams.quick_join(CID, "leader", SKU, "k1")
    # After the leader paid, the retry returns the team as it is now (open).
    await pay(engine, first.order)
    late = await engine.teams.open(CID, "leader", SKU, 1, "k1")
    assert late.replayed
    assert late.team.state is TeamState.OPEN
    assert late.order.state is OrderState.PAID
    assert await engine.runtime.redis.hlen(KEYS.teams) == 1
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- the leader pays


async def test_leader_payment_opens_the_team_and_starts_its_clock(engine: Engine) -> None:
    await start(engine)
    opened = await open_team(engine, "leader")
    before = await engine.runtime.now()
    paid = await pay(engine, opened.order)
    after = await engine.runtime.now()
    assert paid.state is OrderState.PAID

    team = await engine.teams.get(opened.team.team_id)
    assert team.state is TeamState.OPEN
    assert team.opened_at is not None and team.expires_at is not None
    assert before <= team.opened_at <= after
    assert team.expires_at == team.opened_at + TTL
    assert (team.held, team.paid, team.remaining) == (0, 1, 2)
    (paid_event,) = await order_events(engine, paid.order_id, "order.paid")
    assert int(paid_event["at"]) == to_ms(team.opened_at)
    assert await engine.teams.joinable(CID, SKU) == [team]
    assert await engine.runtime.redis.zscore(KEYS.team_expiry, team.team_id) == to_ms(
        team.expires_at
    )
    types = [e["type"] for e in await team_events(engine, team.team_id)]
    assert types == ["team.created", "team.opened"]
    assert await abc(engine) == (99, 0, 1)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- join


async def test_join_holds_a_seat_until_the_hold_deadline(engine: Engine) -> None:
    await start(engine)
    team = await open_paid_team(engine)
    result = await engine.teams.join(team.team_id, "friend", "j1")
    assert not result.opened and not result.replayed
    order = result.order
    assert order.state is OrderState.HELD
    assert (order.kind, order.team_id, order.user_id) == (OrderKind.TEAM, team.team_id, "friend")
    assert (order.qty, order.amount) == (1, PRICE)
    assert order.expires_at == order.created_at + HOLD  # the hold ends before the team does

    now_team = await engine.teams.get(team.team_id)
    assert result.team == now_team
    assert (now_team.held, now_team.paid, now_team.remaining) == (1, 1, 1)
    assert now_team.seats == (*team.seats, Seat(order.order_id, "friend"))
    assert await abc(engine) == (98, 1, 1)
    joined = (await team_events(engine, team.team_id))[-1]
    assert (joined["type"], joined["order"]) == ("team.joined", order.order_id)
    assert Team.from_record(team.team_id, joined["record"]) == now_team
    await assert_invariants(engine, CID)


async def test_members_buy_the_leaders_quantity_per_seat(engine: Engine) -> None:
    await start(engine, limit=3)
    team = await open_paid_team_of(engine, "leader", qty=2)
    order = await join(engine, team.team_id, "friend")
    assert (order.qty, order.amount) == (2, 2 * PRICE)
    assert await units_of(engine, "friend") == 2
    assert await abc(engine) == (96, 2, 2)
    other = await open_paid_team_of(engine, "leader-2", qty=2)
    with pytest.raises(LimitExceeded) as caught:
        await engine.teams.join(other.team_id, "friend", "j2")  # 2 held + 2 > 3
    assert caught.value.details == {"units_left": 1}
    await assert_invariants(engine, CID)


async def test_join_deadline_is_capped_by_the_team_expiry(engine: Engine) -> None:
    await start(engine, hold_seconds=60, team_ttl_seconds=30)
    team = await open_paid_team(engine)
    order = await join(engine, team.team_id, "friend")
    assert team.expires_at is not None
    assert order.expires_at == team.expires_at
    assert order.expires_at < order.created_at + HOLD
    assert await engine.runtime.redis.zscore(KEYS.deadlines, order.order_id) == to_ms(
        team.expires_at
    )
    await assert_invariants(engine, CID)


async def test_join_an_unknown_team_is_not_found(engine: Engine) -> None:
    await start(engine)
    with pytest.raises(NotFound):
        await engine.teams.join(f"{CID}.t999", "friend", "k1")
    with pytest.raises(NotFound):
        await engine.teams.join("nope.t1", "friend", "k1")
    with pytest.raises(NotFound):
        await engine.teams.get(f"{CID}.t999")
    with pytest.raises(ValidationError):
        await engine.teams.join("not-a-team-id", "friend", "k1")
    assert await engine.runtime.redis.hlen(KEYS.orders) == 0
    await assert_invariants(engine, CID)


async def test_join_a_team_whose_seats_are_all_taken_is_team_full(engine: Engine) -> None:
    await start(engine, team_size=2)
    team = await open_paid_team(engine)
    await join(engine, team.team_id, "first")  # held: the seat counts as taken
    with pytest.raises(TeamFull) as caught:
        await engine.teams.join(team.team_id, "second", "k1")
    assert caught.value.code == "team_full"
    full = await engine.teams.get(team.team_id)
    assert (full.held, full.paid, full.remaining) == (1, 1, 0)
    assert await units_of(engine, "second") == 0
    assert await abc(engine) == (98, 1, 1)
    assert await joinable_ids(engine) == []
    await assert_invariants(engine, CID)


async def test_member_and_leader_cannot_join_the_team_twice(engine: Engine) -> None:
    await start(engine, limit=5)
    team = await open_paid_team(engine, "leader")
    await join(engine, team.team_id, "friend")
    with pytest.raises(AlreadyInTeam):
        await engine.teams.join(team.team_id, "friend", "another-key")
    with pytest.raises(AlreadyInTeam):
        await engine.teams.join(team.team_id, "leader", "k-leader")
    current = await engine.teams.get(team.team_id)
    assert (current.held, current.paid) == (1, 1)
    assert await units_of(engine, "friend") == 1
    assert await units_of(engine, "leader") == 1
    await assert_invariants(engine, CID)


async def test_join_over_the_per_user_limit_is_rejected(engine: Engine) -> None:
    await start(engine, limit=1)
    first = await open_paid_team(engine, "lead-a")
    second = await open_paid_team(engine, "lead-b")
    await join(engine, first.team_id, "friend")
    with pytest.raises(LimitExceeded) as caught:
        await engine.teams.join(second.team_id, "friend", "k2")
    assert caught.value.details == {"units_left": 0}
    assert (await engine.teams.get(second.team_id)).held == 0
    await assert_invariants(engine, CID)


async def test_join_with_no_stock_left_is_sold_out(engine: Engine) -> None:
    await start(engine, stock=2)
    team = await open_paid_team(engine)
    await join(engine, team.team_id, "first")
    with pytest.raises(SoldOut) as caught:
        await engine.teams.join(team.team_id, "second", "k1")
    assert caught.value.details == {"available": 0}
    current = await engine.teams.get(team.team_id)
    assert (current.held, current.paid, current.remaining) == (1, 1, 1)
    assert await abc(engine) == (0, 1, 1)
    await assert_invariants(engine, CID)


async def test_join_retry_returns_the_same_seat_and_a_reused_key_mismatches(
    engine: Engine,
) -> None:
    await start(engine, limit=5)
    team = await open_paid_team(engine, "lead-a")
    other = await open_paid_team(engine, "lead-b")
    first = await engine.teams.join(team.team_id, "friend", "j1")
    retry = await engine.teams.join(team.team_id, "friend", "j1")
    assert retry.replayed and not retry.opened
    assert retry.order == first.order
    assert retry.team == first.team
    with pytest.raises(IdempotencyMismatch):
        await engine.teams.join(other.team_id, "friend", "j1")
    assert (await engine.teams.get(team.team_id)).held == 1
    assert (await engine.teams.get(other.team_id)).held == 0
    assert await units_of(engine, "friend") == 1
    await assert_invariants(engine, CID)


async def test_join_after_the_team_expiry_is_team_closed(engine: Engine) -> None:
    await start(engine)
    team = await open_paid_team(engine)
    await age_team(engine, team.team_id, TTL_MS + 1_000)
    with pytest.raises(TeamClosed) as caught:
        await engine.teams.join(team.team_id, "friend", "k1")
    assert caught.value.details == {"team_state": "expired"}
    assert await joinable_ids(engine) == []
    # quick_join does not pick the expired team either: it opens a new one.
    quick = await engine.teams.quick_join(CID, "friend", SKU, "q1")
    assert quick.opened and quick.team.team_id != team.team_id
    await engine.reaper.expire_campaign(CID)
    with pytest.raises(TeamClosed) as failed:
        await engine.teams.join(team.team_id, "friend", "k2")
    assert failed.value.details == {"team_state": "failed"}
    await assert_invariants(engine, CID)


async def test_after_the_campaign_end_open_teams_fill_but_no_team_is_opened(
    engine: Engine,
) -> None:
    campaign = await start(engine, starts_in=-1, lasts=1.7)
    team = await open_paid_team(engine, "leader")
    await until(engine.runtime.now, campaign.ends_at)
    assert (await engine.campaigns.get(CID)).status.value == "ended"

    with pytest.raises(Ended) as no_new:
        await engine.teams.open(CID, "late-0", SKU, 1, "k1")
    assert no_new.value.details == {"ends_at": campaign.ends_at}
    assert await joinable_ids(engine) == [team.team_id]
    member = await join(engine, team.team_id, "late-1")
    assert member.expires_at == member.created_at + HOLD
    quick = await engine.teams.quick_join(CID, "late-2", SKU, "q1")
    assert quick.team.team_id == team.team_id and not quick.opened
    with pytest.raises(Ended) as none_fits:
        await engine.teams.quick_join(CID, "late-3", SKU, "q1")
    assert none_fits.value.details == {"ends_at": campaign.ends_at}

    await pay(engine, member)
    await pay(engine, quick.order)
    done = await engine.teams.get(team.team_id)
    assert done.state is TeamState.SUCCEEDED
    assert await engine.runtime.redis.hlen(KEYS.teams) == 1
    assert await abc(engine) == (97, 0, 3)
    await assert_invariants(engine, CID)


async def test_a_leaders_hold_ends_with_the_campaign(engine: Engine) -> None:
    """A pending team must open before the campaign ends: the leader's payment deadline is
    capped at the end, and paying after it is hold_expired."""
    campaign = await start(engine, starts_in=-1, lasts=1.5)  # ends long before a 60 s hold
    opened = await open_team(engine, "leader")
    assert opened.order.expires_at == campaign.ends_at
    await until(engine.runtime.now, campaign.ends_at)
    with pytest.raises(HoldExpired):
        await pay(engine, opened.order)
    await engine.reaper.run_once()
    dissolved = await engine.teams.get(opened.team.team_id)
    assert dissolved.state is TeamState.DISSOLVED
    assert await abc(engine) == (100, 0, 0)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- members pay


async def test_the_last_paid_seat_makes_the_team_succeed(engine: Engine) -> None:
    await start(engine)
    team = await open_paid_team(engine)
    first = await join(engine, team.team_id, "first")
    second = await join(engine, team.team_id, "second")
    assert await joinable_ids(engine) == []  # held seats fill the team

    await pay(engine, first)
    mid = await engine.teams.get(team.team_id)
    assert (mid.state, mid.held, mid.paid) == (TeamState.OPEN, 1, 2)
    seat_paid = (await team_events(engine, team.team_id))[-1]
    assert (seat_paid["type"], seat_paid["order"]) == ("team.seat_paid", first.order_id)

    paid = await pay(engine, second)
    assert paid.state is OrderState.PAID
    done = await engine.teams.get(team.team_id)
    assert (done.state, done.held, done.paid, done.remaining) == (TeamState.SUCCEEDED, 0, 3, 0)
    assert done.expires_at == team.expires_at
    assert await joinable_ids(engine) == []
    assert await engine.runtime.redis.zscore(KEYS.team_expiry, team.team_id) is None
    succeeded = (await team_events(engine, team.team_id))[-1]
    assert (succeeded["type"], succeeded["order"]) == ("team.succeeded", second.order_id)
    assert await abc(engine) == (97, 0, 3)
    with pytest.raises(TeamClosed) as closed:
        await engine.teams.join(team.team_id, "third", "k1")
    assert closed.value.details == {"team_state": "succeeded"}
    # A paid seat of a succeeded team is no longer "in progress" but it is not held either.
    with pytest.raises(InvalidState):
        await engine.orders.cancel(first.order_id, "first")
    # Nothing expires a succeeded team.
    await age_team(engine, team.team_id, TTL_MS + 1_000)
    assert await engine.reaper.expire_campaign(CID) == (0, False)
    assert (await engine.teams.get(team.team_id)).state is TeamState.SUCCEEDED
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- cancel and refund


async def test_cancelling_a_held_seat_frees_it_and_the_team_is_joinable_again(
    engine: Engine,
) -> None:
    await start(engine, team_size=2)
    team = await open_paid_team(engine)
    member = await join(engine, team.team_id, "friend")
    assert await joinable_ids(engine) == []

    cancelled = await engine.orders.cancel(member.order_id, "friend")
    assert cancelled.state is OrderState.CANCELLED
    freed = await engine.teams.get(team.team_id)
    assert (freed.state, freed.held, freed.paid, freed.remaining) == (TeamState.OPEN, 0, 1, 1)
    assert freed.seats == team.seats
    assert await joinable_ids(engine) == [team.team_id]
    assert await abc(engine) == (99, 0, 1)
    assert await units_of(engine, "friend") == 0
    released = (await team_events(engine, team.team_id))[-1]
    assert (released["type"], released["order"], released["reason"]) == (
        "team.seat_released",
        member.order_id,
        "user",
    )
    # The same user may take the freed seat again (with a new key).
    again = await engine.teams.join(team.team_id, "friend", "again")
    assert again.order.order_id != member.order_id
    await assert_invariants(engine, CID)


async def test_a_paid_seat_of_an_open_team_cannot_be_cancelled(engine: Engine) -> None:
    await start(engine)
    team = await open_paid_team(engine, "leader")
    member = await pay(engine, await join(engine, team.team_id, "friend"))
    with pytest.raises(TeamInProgress):
        await engine.orders.cancel(member.order_id, "friend")
    with pytest.raises(TeamInProgress):
        await engine.orders.cancel(team.seats[0].order_id, "leader")
    current = await engine.teams.get(team.team_id)
    assert (current.state, current.paid) == (TeamState.OPEN, 2)
    assert (await engine.orders.get(member.order_id)).state is OrderState.PAID
    assert await abc(engine) == (98, 0, 2)
    await assert_invariants(engine, CID)


async def test_after_sale_refund_waits_for_the_team_to_succeed(engine: Engine) -> None:
    await start(engine, team_size=2)
    team = await open_paid_team(engine, "leader")
    leader_order = team.seats[0].order_id
    with pytest.raises(TeamInProgress):
        await engine.orders.refund(leader_order, restock=True)
    assert (await engine.orders.get(leader_order)).state is OrderState.PAID

    await pay(engine, await join(engine, team.team_id, "friend"))
    assert (await engine.teams.get(team.team_id)).state is TeamState.SUCCEEDED
    refunded = await engine.orders.refund(leader_order, restock=True)
    assert refunded.state is OrderState.REFUNDED
    assert await abc(engine) == (99, 0, 1)
    assert await units_of(engine, "leader") == 0
    # The team stays succeeded: an after-sale refund does not undo the group-buy.
    assert (await engine.teams.get(team.team_id)).state is TeamState.SUCCEEDED
    (event,) = await order_events(engine, leader_order, "order.refunded")
    assert event["reason"] == "restock"
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- dissolved teams


async def test_leader_cancelling_a_pending_team_dissolves_it(engine: Engine) -> None:
    await start(engine)
    opened = await open_team(engine, "leader")
    cancelled = await engine.orders.cancel(opened.order.order_id, "leader")
    assert cancelled.state is OrderState.CANCELLED

    team = await engine.teams.get(opened.team.team_id)
    assert (team.state, team.why, team.held, team.paid) == (
        TeamState.DISSOLVED,
        "leader_cancelled",
        0,
        0,
    )
    assert team.opened_at is None
    assert await abc(engine) == (100, 0, 0)
    assert await units_of(engine, "leader") == 0
    dissolved = (await team_events(engine, team.team_id))[-1]
    assert dissolved["type"] == "team.dissolved"
    assert Team.from_record(team.team_id, dissolved["record"]) == team
    with pytest.raises(TeamClosed) as caught:
        await engine.teams.join(team.team_id, "friend", "k1")
    assert caught.value.details == {"team_state": "dissolved"}
    with pytest.raises(InvalidState):
        await pay(engine, opened.order)
    await assert_invariants(engine, CID)


async def test_leader_hold_expiry_dissolves_the_pending_team(engine: Engine) -> None:
    await start(engine)
    opened = await open_team(engine, "leader")
    await age_order(engine, opened.order.order_id, HOLD_MS + 1_000)
    ended, _ = await engine.reaper.expire_campaign(CID)
    assert ended == 1

    team = await engine.teams.get(opened.team.team_id)
    assert (team.state, team.why) == (TeamState.DISSOLVED, "leader_unpaid")
    assert (await engine.orders.get(opened.order.order_id)).state is OrderState.EXPIRED
    assert await abc(engine) == (100, 0, 0)
    assert await units_of(engine, "leader") == 0
    with pytest.raises(HoldExpired):
        await pay(engine, opened.order)
    assert await engine.reaper.expire_campaign(CID) == (0, False)
    types = [e["type"] for e in await team_events(engine, team.team_id)]
    assert types == ["team.created", "team.dissolved"]
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- seat expiry


async def test_held_seat_expiry_releases_the_seat_and_its_payment_is_refused(
    engine: Engine,
) -> None:
    await start(engine, team_size=2)
    team = await open_paid_team(engine)
    member = await join(engine, team.team_id, "friend")
    await age_order(engine, member.order_id, HOLD_MS + 1_000)
    ended, _ = await engine.reaper.expire_campaign(CID)
    assert ended == 1

    assert (await engine.orders.get(member.order_id)).state is OrderState.EXPIRED
    freed = await engine.teams.get(team.team_id)
    assert (freed.state, freed.held, freed.paid) == (TeamState.OPEN, 0, 1)
    assert freed.seats == team.seats
    assert await joinable_ids(engine) == [team.team_id]
    released = (await team_events(engine, team.team_id))[-1]
    assert (released["type"], released["reason"]) == ("team.seat_released", "deadline")
    assert await abc(engine) == (99, 0, 1)

    with pytest.raises(HoldExpired):
        await pay(engine, member)
    replacement = await join(engine, team.team_id, "other")
    await pay(engine, replacement)
    assert (await engine.teams.get(team.team_id)).state is TeamState.SUCCEEDED
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- team expiry


async def test_team_expiry_fails_the_team_refunds_paid_and_expires_held_seats(
    engine: Engine,
) -> None:
    await start(engine, team_size=4)
    team = await open_paid_team(engine, "leader")
    paid_member = await pay(engine, await join(engine, team.team_id, "paid-friend"))
    held_member = await join(engine, team.team_id, "held-friend")
    assert await abc(engine) == (97, 1, 2)

    await age_team(engine, team.team_id, TTL_MS + 1_000)
    ended, _ = await engine.reaper.expire_campaign(CID)
    assert ended == 1  # one team failed (its held seat ended with it)

    failed = await engine.teams.get(team.team_id)
    assert (failed.state, failed.why, failed.held) == (TeamState.FAILED, "expired", 0)
    leader_order = team.seats[0].order_id
    for order_id in (leader_order, paid_member.order_id):
        assert (await engine.orders.get(order_id)).state is OrderState.REFUNDED
        (refund,) = await order_events(engine, order_id, "order.refunded")
        assert refund["reason"] == "team_failed"
    held_now = await engine.orders.get(held_member.order_id)
    assert held_now.state is OrderState.EXPIRED
    assert await abc(engine) == (100, 0, 0)
    for user in ("leader", "paid-friend", "held-friend"):
        assert await units_of(engine, user) == 0
    assert await joinable_ids(engine) == []
    assert await engine.runtime.redis.zscore(KEYS.team_expiry, team.team_id) is None
    assert (await team_events(engine, team.team_id))[-1]["type"] == "team.failed"

    states = [o.state for o in await engine.teams.orders(team.team_id)]
    assert states == [OrderState.REFUNDED, OrderState.REFUNDED, OrderState.EXPIRED]
    with pytest.raises(HoldExpired):
        await pay(engine, held_member)
    with pytest.raises(TeamClosed) as closed:
        await engine.teams.join(team.team_id, "late", "k1")
    assert closed.value.details == {"team_state": "failed"}
    assert await engine.reaper.expire_campaign(CID) == (0, False), "a failure ran twice"
    assert (await engine.teams.view(team.team_id, "someone")).share_state is ShareState.FAILED
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- quick_join


async def test_quick_join_prefers_fewest_remaining_then_earliest_expiry(engine: Engine) -> None:
    await start(engine, team_size=4, limit=5)
    roomy = await open_paid_team(engine, "lead-a")  # 3 seats left
    later = await open_paid_team(engine, "lead-b")
    await join(engine, later.team_id, "b-friend")  # 2 seats left
    earlier = await open_paid_team(engine, "lead-c")
    await join(engine, earlier.team_id, "c-friend")  # 2 seats left, expiring first:
    await age_team(engine, earlier.team_id, 5_000)

    picks = []
    for n in range(4):
        result = await engine.teams.quick_join(CID, f"quick-{n}", SKU, f"q{n}")
        assert not result.opened
        assert result.order.state is OrderState.HELD and result.order.qty == 1
        picks.append(result.team.team_id)
    # earlier (2 left, expires first), earlier again (1 left), later (2 left), later (1 left).
    assert picks == [earlier.team_id, earlier.team_id, later.team_id, later.team_id]
    assert await joinable_ids(engine) == [roomy.team_id]
    assert (await engine.teams.get(roomy.team_id)).held == 0
    await assert_invariants(engine, CID)


async def test_quick_join_skips_teams_the_user_is_in(engine: Engine) -> None:
    await start(engine, team_size=3, limit=5)
    roomy = await open_paid_team(engine, "lead-a")  # 2 seats left
    near_full = await open_paid_team(engine, "lead-b")
    await join(engine, near_full.team_id, "shopper")  # 1 seat left, shopper sits in it

    result = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert result.team.team_id == roomy.team_id and not result.opened
    # Both teams have 1 seat left and roomy expires first, but lead-a leads it.
    own = await engine.teams.quick_join(CID, "lead-a", SKU, "q2")
    assert own.team.team_id == near_full.team_id and not own.opened
    await join(engine, roomy.team_id, "filler")
    assert await joinable_ids(engine) == []
    # A leader is never matched into their own team: with only that team left, a new one opens.
    mine = await open_paid_team(engine, "solo")
    quick = await engine.teams.quick_join(CID, "solo", SKU, "q3")
    assert quick.opened and quick.team.team_id != mine.team_id
    assert quick.team.state is TeamState.PENDING
    for team_id in (roomy.team_id, near_full.team_id, mine.team_id):
        users = [seat.user_id for seat in (await engine.teams.get(team_id)).seats]
        assert len(users) == len(set(users))
    await assert_invariants(engine, CID)


async def test_quick_join_skips_teams_the_user_cannot_afford(engine: Engine) -> None:
    """A team of 2 units per seat is the best candidate, but the shopper has 1 unit of their
    limit left: the next team that fits is taken; with none left, a one-unit team opens."""
    await start(engine, team_size=3, limit=2)
    pairs = await open_paid_team_of(engine, "lead-pairs", 2)
    await join(engine, pairs.team_id, "pair-buyer")  # 1 seat left: first in line
    singles = await open_paid_team(engine, "lead-singles")  # 2 seats left
    held = await open_team(engine, "shopper")  # the shopper holds 1 of 2 units
    assert await joinable_ids(engine, viewer="shopper") == [pairs.team_id, singles.team_id]

    result = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert result.team.team_id == singles.team_id and result.order.qty == 1
    await engine.orders.cancel(held.order.order_id, "shopper")
    await join(engine, singles.team_id, "filler")  # singles is full now
    # The shopper has 1 unit left again and only the 2-unit team is open: a new team opens.
    again = await engine.teams.quick_join(CID, "shopper", SKU, "q2")
    assert again.opened and again.team.qty == 1 and again.team.leader_id == "shopper"
    # Someone who can afford the 2-unit seat still gets it.
    other = await engine.teams.quick_join(CID, "other", SKU, "q1")
    assert other.team.team_id == pairs.team_id and other.order.qty == 2
    await assert_invariants(engine, CID)


async def test_quick_join_opens_a_pending_team_when_none_fits(engine: Engine) -> None:
    await start(engine, limit=5)
    await open_team(engine, "pending-leader")  # pending: not a candidate
    result = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert result.opened and not result.replayed
    team = result.team
    assert (team.state, team.leader_id, team.qty, team.size) == (
        TeamState.PENDING,
        "shopper",
        1,
        3,
    )
    assert team.seats == (Seat(result.order.order_id, "shopper"),)
    assert result.order.kind is OrderKind.TEAM and result.order.team_id == team.team_id
    retry = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert retry.replayed and retry.opened and retry.order == result.order
    await pay(engine, result.order)
    assert await joinable_ids(engine) == [team.team_id]
    assert await engine.runtime.redis.hlen(KEYS.teams) == 2
    await assert_invariants(engine, CID)


async def test_quick_join_key_reused_for_a_join_of_the_same_team_mismatches(
    engine: Engine,
) -> None:
    """The idempotency record keeps the operation: a quick-join's key replayed as a join of
    the very team it seated the user in is another request, not a retry."""
    await start(engine, limit=5)
    team = await open_paid_team(engine, "leader")
    seated = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert seated.team.team_id == team.team_id and not seated.opened
    with pytest.raises(IdempotencyMismatch):
        await engine.teams.join(team.team_id, "shopper", "q1")
    retry = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert retry.replayed and retry.order == seated.order
    assert (await engine.teams.get(team.team_id)).held == 1
    await assert_invariants(engine, CID)


async def test_quick_join_rejections_leave_no_trace(engine: Engine) -> None:
    await start(engine, limit=1, stock=3)
    team = await open_paid_team(engine, "leader")
    await join(engine, team.team_id, "friend")
    with pytest.raises(LimitExceeded):
        await engine.teams.quick_join(CID, "friend", SKU, "q1")
    await open_team(engine, "other")  # stock: 3 - leader - friend - other = 0
    with pytest.raises(SoldOut) as caught:
        await engine.teams.quick_join(CID, "late", SKU, "q2")
    assert caught.value.details == {"available": 0}
    assert await engine.runtime.redis.hlen(KEYS.teams) == 2
    assert (await engine.teams.get(team.team_id)).held == 1
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- invalidation


async def test_invalidation_fails_open_teams_dissolves_pending_and_keeps_succeeded(
    engine: Engine,
) -> None:
    await start(engine, team_size=3)
    done = await open_paid_team(engine, "lead-s")
    for user in ("s1", "s2"):
        await pay(engine, await join(engine, done.team_id, user))
    running = await open_paid_team(engine, "lead-o")
    paid_member = await pay(engine, await join(engine, running.team_id, "o1"))
    held_member = await join(engine, running.team_id, "o2")
    pending = await open_team(engine, "lead-p")
    assert await abc(engine) == (93, 2, 5)

    await engine.campaigns.invalidate(CID)  # cascades at once (docs/lifecycle.md#campaign)
    with pytest.raises(Invalidated):
        await engine.teams.join(running.team_id, "new", "k1")
    for unpaid in (held_member, pending.order):
        with pytest.raises((Invalidated, InvalidState)):  # invalidated, or already cancelled
            await pay(engine, unpaid)
    assert (await engine.teams.view(running.team_id, "x")).share_state is (
        ShareState.CAMPAIGN_INVALIDATED
    )

    await engine.reaper.expire_campaign(CID)  # nothing left to do, or the rest of the cascade
    failed = await engine.teams.get(running.team_id)
    assert (failed.state, failed.why) == (TeamState.FAILED, "invalidated")
    for order_id in (running.seats[0].order_id, paid_member.order_id):
        assert (await engine.orders.get(order_id)).state is OrderState.REFUNDED
        reasons = [e["reason"] for e in await order_events(engine, order_id, "order.refunded")]
        assert reasons == ["team_failed"]
    assert (await engine.orders.get(held_member.order_id)).state is OrderState.CANCELLED
    dissolved = await engine.teams.get(pending.team.team_id)
    assert (dissolved.state, dissolved.why) == (TeamState.DISSOLVED, "invalidated")
    assert (await engine.orders.get(pending.order.order_id)).state is OrderState.CANCELLED
    kept = await engine.teams.get(done.team_id)
    assert (kept.state, kept.paid) == (TeamState.SUCCEEDED, 3)
    assert {o.state for o in await engine.teams.orders(done.team_id)} == {OrderState.PAID}
    assert await abc(engine) == (97, 0, 3)
    view = await engine.teams.view(done.team_id, "x")
    assert view.share_state is ShareState.SUCCEEDED
    assert (await engine.teams.view(pending.team.team_id)).share_state is (
        ShareState.CAMPAIGN_INVALIDATED
    )
    assert await engine.reaper.expire_campaign(CID) == (0, True)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- joinable list


async def test_joinable_lists_open_teams_with_free_seats_fewest_remaining_first(
    engine: Engine,
) -> None:
    await start(engine, team_size=3, limit=5, skus=(SKU, "sku-2"))
    two_left = await open_paid_team(engine, "lead-a")
    one_left = await open_paid_team(engine, "lead-b")
    await join(engine, one_left.team_id, "member-b")  # held seat counts as taken
    full = await open_paid_team(engine, "lead-c")
    for user in ("c1", "c2"):
        await join(engine, full.team_id, user)
    expired = await open_paid_team(engine, "lead-d")
    await age_team(engine, expired.team_id, TTL_MS + 1_000)
    await open_team(engine, "lead-e")  # pending
    other_sku = await open_paid_team(engine, "lead-f", sku="sku-2")

    assert await joinable_ids(engine) == [one_left.team_id, two_left.team_id]
    assert await joinable_ids(engine, viewer="member-b") == [two_left.team_id]
    assert await joinable_ids(engine, viewer="lead-a") == [one_left.team_id]
    assert await joinable_ids(engine, viewer="stranger") == [one_left.team_id, two_left.team_id]
    assert await joinable_ids(engine, limit=1) == [one_left.team_id]
    listed = await engine.teams.joinable(CID, "sku-2")
    assert [t.team_id for t in listed] == [other_sku.team_id]
    assert listed[0] == await engine.teams.get(other_sku.team_id)
    for bad in (0, 101):
        with pytest.raises(ValidationError):
            await engine.teams.joinable(CID, SKU, None, bad)
    await assert_invariants(engine, CID)


async def test_joinable_orders_equal_remaining_seats_by_expiry(engine: Engine) -> None:
    await start(engine, limit=5)
    first = await open_paid_team(engine, "lead-a")
    second = await open_paid_team(engine, "lead-b")
    third = await open_paid_team(engine, "lead-c")
    assert await joinable_ids(engine) == [first.team_id, second.team_id, third.team_id]
    await age_team(engine, third.team_id, 10_000)
    assert await joinable_ids(engine) == [third.team_id, first.team_id, second.team_id]
    await join(engine, second.team_id, "friend")
    assert await joinable_ids(engine) == [second.team_id, third.team_id, first.team_id]
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- share view


async def test_share_view_of_every_team_state(engine: Engine) -> None:
    await start(engine, team_size=2, limit=5)
    pending = (await open_team(engine, "shopper-1234")).team
    view = await engine.teams.view(pending.team_id, "visitor")
    assert view.share_state is ShareState.PENDING and not view.viewer_can_join
    assert [m.name for m in view.members] == ["s***4"]
    assert view.members[0].leader and not view.members[0].paid

    team = await open_paid_team(engine, "alice-9")
    view = await engine.teams.view(team.team_id, "visitor")
    assert view.share_state is ShareState.OPEN
    assert view.viewer_can_join and not view.viewer_in_team
    assert (view.team.size, view.team.paid, view.team.held, view.team.remaining) == (2, 1, 0, 1)
    assert view.team.expires_at == team.expires_at
    assert [(m.name, m.leader, m.paid) for m in view.members] == [("a***9", True, True)]
    leader_view = await engine.teams.view(team.team_id, "alice-9")
    assert leader_view.viewer_in_team and not leader_view.viewer_can_join

    member = await join(engine, team.team_id, "bob")
    view = await engine.teams.view(team.team_id, "visitor")
    assert view.share_state is ShareState.FULL_AWAITING_PAYMENT and not view.viewer_can_join
    assert [(m.name, m.leader, m.paid) for m in view.members] == [
        ("a***9", True, True),
        ("b***b", False, False),
    ]
    member_view = await engine.teams.view(team.team_id, "bob")
    assert member_view.viewer_in_team and not member_view.viewer_can_join

    await pay(engine, member)
    view = await engine.teams.view(team.team_id, "visitor")
    assert view.share_state is ShareState.SUCCEEDED and not view.viewer_can_join
    assert all(m.paid for m in view.members)

    expiring = await open_paid_team(engine, "carol")
    await age_team(engine, expiring.team_id, TTL_MS + 1_000)
    assert (await engine.teams.view(expiring.team_id, "v")).share_state is ShareState.FAILED
    await engine.reaper.expire_campaign(CID)
    view = await engine.teams.view(expiring.team_id, "v")
    assert view.share_state is ShareState.FAILED and not view.viewer_can_join
    assert view.team.why == "expired"

    leaving = await open_team(engine, "dave")
    await engine.orders.cancel(leaving.order.order_id, "dave")
    view = await engine.teams.view(leaving.team.team_id, "v")
    assert view.share_state is ShareState.DISSOLVED and not view.viewer_can_join

    still_open = await open_paid_team(engine, "erin")
    await engine.campaigns.invalidate(CID)
    view = await engine.teams.view(still_open.team_id, "v")
    assert view.share_state is ShareState.CAMPAIGN_INVALIDATED and not view.viewer_can_join
    assert (await engine.teams.view(team.team_id, "v")).share_state is ShareState.SUCCEEDED
    await engine.reaper.expire_campaign(CID)
    view = await engine.teams.view(still_open.team_id, "v")
    assert view.share_state is ShareState.CAMPAIGN_INVALIDATED
    assert view.team.state is TeamState.FAILED
    await assert_invariants(engine, CID)


def test_mask_user_keeps_first_and_last_characters() -> None:
    assert mask_user("shopper-1234") == "s***4"
    assert mask_user("ab") == "a***b"
    assert mask_user("x") == "x***"


async def test_share_view_of_an_unknown_team_is_not_found(engine: Engine) -> None:
    await start(engine)
    with pytest.raises(NotFound):
        await engine.teams.view(f"{CID}.t42", "visitor")
    with pytest.raises(ValidationError):
        await engine.teams.view(f"{CID}.t1", "bad viewer!")


# --------------------------------------------------------------------------- orders of a team


async def test_orders_of_a_team_are_its_seats_with_kind_team(engine: Engine) -> None:
    await start(engine, team_size=3)
    team = await open_paid_team(engine, "leader")
    paid = await pay(engine, await join(engine, team.team_id, "paid"))
    held = await join(engine, team.team_id, "held")

    orders = await engine.teams.orders(team.team_id)
    assert [o.user_id for o in orders] == ["leader", "paid", "held"]
    assert [o.state for o in orders] == [OrderState.PAID, OrderState.PAID, OrderState.HELD]
    assert all(o.kind is OrderKind.TEAM and o.team_id == team.team_id for o in orders)
    assert orders[1] == paid and orders[2] == held

    await engine.orders.cancel(held.order_id, "held")
    assert [o.user_id for o in await engine.teams.orders(team.team_id)] == ["leader", "paid"]
    # Another team's orders are its own.
    other = await open_paid_team(engine, "other")
    assert [o.team_id for o in await engine.teams.orders(other.team_id)] == [other.team_id]
    with pytest.raises(NotFound):
        await engine.teams.orders(f"{CID}.t99")
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- events


async def test_every_team_event_reaches_the_stream_with_the_team_record(engine: Engine) -> None:
    await start(engine, team_size=3, limit=5)
    winner = await open_paid_team(engine, "leader")  # team.created, team.opened
    dropped = await join(engine, winner.team_id, "fickle")  # team.joined
    await engine.orders.cancel(dropped.order_id, "fickle")  # team.seat_released
    await pay(engine, await join(engine, winner.team_id, "loyal-1"))  # team.seat_paid
    await pay(engine, await join(engine, winner.team_id, "loyal-2"))  # team.succeeded
    loser = await open_paid_team(engine, "loser")
    await pay(engine, await join(engine, loser.team_id, "p1"))
    await age_team(engine, loser.team_id, TTL_MS + 1_000)
    await engine.reaper.expire_campaign(CID)  # team.failed + order.refunded team_failed
    gone = await open_team(engine, "quitter")
    await engine.orders.cancel(gone.order.order_id, "quitter")  # team.dissolved

    stream = await events(engine)
    entries: Any = await engine.runtime.redis.xrange(KEYS.events)
    decoded = [Event.decode(stream_id, dict(fields)) for stream_id, fields in entries]
    assert [e.type for e in decoded] == [e["type"] for e in stream]
    assert all(e.team is not None for e in decoded if e.type.startswith("team."))
    state_of = {
        "team.created": TeamState.PENDING,
        "team.opened": TeamState.OPEN,
        "team.joined": TeamState.OPEN,
        "team.seat_paid": TeamState.OPEN,
        "team.seat_released": TeamState.OPEN,
        "team.succeeded": TeamState.SUCCEEDED,
        "team.failed": TeamState.FAILED,
        "team.dissolved": TeamState.DISSOLVED,
    }
    assert {e["type"] for e in stream if e["type"].startswith("team.")} == set(state_of)
    last: dict[str, Team] = {}
    for event in stream:
        if not event["type"].startswith("team."):
            continue
        team = Team.from_record(event["team"], event["record"])
        assert team.state is state_of[event["type"]], event
        previous = last.get(team.team_id)
        assert previous is None or team.version == previous.version + 1, event
        assert int(event["at"]) > 0
        last[team.team_id] = team
    assert set(last) == {winner.team_id, loser.team_id, gone.team.team_id}
    for team_id, team in last.items():
        assert await engine.teams.get(team_id) == team, "the last event is the current record"
    refunds = [e for e in stream if e["type"] == "order.refunded"]
    assert len(refunds) == 2
    assert {e["reason"] for e in refunds} == {"team_failed"}
    refunded = [Order.from_record(e["order"], e["record"]) for e in refunds]
    assert {o.team_id for o in refunded} == {loser.team_id}
    assert {o.user_id for o in refunded} == {"loser", "p1"}
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- rate limit


async def test_team_attempts_share_the_per_user_rate_limit(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, rate_limit=2)
    async with await Engine.open(settings) as engine:
        await start(engine, limit=5)
        team = await open_paid_team(engine, "leader")
        await early_in_a_second(engine.runtime.now)
        await engine.teams.join(team.team_id, "friend", "j1")
        await engine.teams.quick_join(CID, "friend", SKU, "q1")
        attempts: list[Callable[[], Awaitable[TeamSeatResult]]] = [
            lambda: engine.teams.open(CID, "friend", SKU, 1, "o1"),
            lambda: engine.teams.join(team.team_id, "friend", "j2"),
            lambda: engine.teams.quick_join(CID, "friend", SKU, "q2"),
        ]
        for attempt in attempts:
            with pytest.raises(RateLimited) as caught:
                await attempt()
            assert 0 < caught.value.details["retry_after"] <= 1
        # A retry of an accepted attempt is answered even while limited.
        assert (await engine.teams.join(team.team_id, "friend", "j1")).replayed
        assert await units_of(engine, "friend") == 2
        await assert_invariants(engine, CID)
