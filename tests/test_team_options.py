"""Contract tests of the team deal options (docs/lifecycle.md#team-deal-options): automatic
success at expiry (``auto_success_min_paid``), a leader price per item (``leader_price``)
and a per-order cap (``per_order_limit``), each alone and together, with team expiry, hold
expiry, invalidation, after-sale and failure refunds, and the reaper running twice (two at
once, then once more).

Each test goes through ``engine.teams``, ``engine.orders`` and ``engine.reaper`` and checks
the typed results, the team and order records, the stock, the outbox events, the share view
and the audit (invariants I1 to I3, docs/invariants.md, the amounts included); those that
flush to SQL also check every amount there, the KPIs (GMV, the automatic successes) and that
reconcile finds Redis and SQL equal. Time is moved with ``age_order`` / ``age_team``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from engine import (
    Engine,
    HoldExpired,
    InvalidState,
    LimitExceeded,
    OrderLimitExceeded,
    OrderState,
)
from engine.errors import TeamClosed, ValidationError
from engine.models import Order, Team, TeamState
from engine.reconcile import reconcile
from engine.stats import CampaignStats, campaign_stats
from engine.teams import ShareState
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, team_campaign
from testkit.helpers import age_order, age_team, assert_invariants
from tests.test_team_contract import (
    CID,
    HOLD_MS,
    KEYS,
    PRICE,
    SKU,
    TTL_MS,
    abc,
    join,
    joinable_ids,
    open_paid_team,
    open_team,
    order_events,
    pay,
    start,
    team_events,
    units_of,
)

LEADER_PRICE = 490  # the item's price is PRICE (990)
AGE_TEAM = TTL_MS + 1_000
AGE_HOLD = HOLD_MS + 1_000


# --------------------------------------------------------------------------- helpers


async def reap_twice(engine: Engine) -> int:
    """Two reapers at once, then a third pass that must find nothing left; what they ended."""
    ended = await asyncio.gather(*(engine.reaper.expire_campaign(CID) for _ in range(2)))
    assert (await engine.reaper.expire_campaign(CID))[0] == 0, "something ended twice"
    return sum(n for n, _ in ended)


async def full_team(engine: Engine, leader: str, members: tuple[str, ...]) -> Team:
    """A team whose leader and ``members`` all paid."""
    team = await open_paid_team(engine, leader)
    for member in members:
        await pay(engine, await join(engine, team.team_id, member))
    return await engine.teams.get(team.team_id)


async def flushed_stats(engine: Engine) -> CampaignStats:
    """Drain the outbox into SQL; Redis and SQL must then agree record by record."""
    await FlushWorker(engine.runtime).drain()
    result = await reconcile(engine.runtime, CID)
    assert result.ok, "\n".join(result.differences)
    return await campaign_stats(engine.runtime, await engine.campaigns.get(CID))


async def sql_orders(engine: Engine) -> dict[str, Order]:
    return {s.order.order_id: s.order for s in await engine.runtime.store.campaign_orders(CID)}


# --------------------------------------------------------------------------- automatic success


async def test_an_expiring_team_with_enough_paid_seats_succeeds_automatically(
    engine: Engine,
) -> None:
    """Teams of 4, automatic success from 2 paid seats: at expiry the leader and the paid
    member stand, the held seat is released (expired, its units back, out of the team), and
    the team succeeds with why "auto", exactly once however many reapers run."""
    await start(engine, team_size=4, auto_success_min_paid=2)
    team = await open_paid_team(engine, "leader")
    friend = await pay(engine, await join(engine, team.team_id, "friend"))
    late = await join(engine, team.team_id, "late")
    assert await abc(engine) == (97, 1, 2)

    await age_team(engine, team.team_id, AGE_TEAM)
    assert await reap_twice(engine) == 1

    done = await engine.teams.get(team.team_id)
    assert (done.state, done.why, done.held, done.paid) == (TeamState.SUCCEEDED, "auto", 0, 2)
    assert done.auto_succeeded and done.remaining == 2
    assert [s.user_id for s in done.seats] == ["leader", "friend"]
    assert (await engine.orders.get(friend.order_id)).state is OrderState.PAID
    assert (await engine.orders.get(team.seats[0].order_id)).state is OrderState.PAID
    expired = await engine.orders.get(late.order_id)
    assert expired.state is OrderState.EXPIRED
    (event,) = await order_events(engine, late.order_id, "order.expired")
    assert event["reason"] == "team_succeeded"
    assert await abc(engine) == (98, 0, 2)
    assert (await units_of(engine, "late"), await units_of(engine, "friend")) == (0, 1)
    assert await joinable_ids(engine) == []
    assert await engine.runtime.redis.zscore(KEYS.team_expiry, team.team_id) is None
    last = (await team_events(engine, team.team_id))[-1]
    assert (last["type"], last["reason"], last["order"]) == ("team.succeeded", "auto", "")
    assert Team.from_record(team.team_id, last["record"]) == done

    view = await engine.teams.view(team.team_id, "late")
    assert (view.share_state, view.auto_succeeded) == (ShareState.SUCCEEDED, True)
    assert [(m.leader, m.paid) for m in view.members] == [(True, True), (False, True)]
    assert not view.viewer_in_team and not view.viewer_can_join
    with pytest.raises(TeamClosed) as closed:
        await engine.teams.join(team.team_id, "later", "k1")
    assert closed.value.details == {"team_state": "succeeded"}
    with pytest.raises(HoldExpired):
        await pay(engine, late)
    with pytest.raises(InvalidState):  # a paid seat of an ended team: refund, not cancel
        await engine.orders.cancel(friend.order_id, "friend")
    await assert_invariants(engine, CID)

    stats = await flushed_stats(engine)
    assert stats.teams is not None
    teams = stats.teams
    assert (teams.succeeded, teams.filled, teams.auto_succeeded) == (1, 0, 1)
    assert (teams.auto_unfilled_seats, teams.failed, teams.success_rate) == (2, 0, 1.0)
    assert teams.mean_time_to_fill_s is None  # it never filled
    stored = await engine.runtime.store.get_team(team.team_id)
    assert stored == done


async def test_without_enough_paid_seats_an_expiring_team_fails_as_before(
    engine: Engine,
) -> None:
    await start(engine, team_size=4, auto_success_min_paid=3)
    team = await open_paid_team(engine, "leader")
    friend = await pay(engine, await join(engine, team.team_id, "friend"))
    held = await join(engine, team.team_id, "held")
    await age_team(engine, team.team_id, AGE_TEAM)
    view = await engine.teams.view(team.team_id)  # before the reaper: about to fail
    assert (view.share_state, view.auto_succeeded) == (ShareState.FAILED, False)
    assert await reap_twice(engine) == 1

    failed = await engine.teams.get(team.team_id)
    assert (failed.state, failed.why, failed.paid) == (TeamState.FAILED, "expired", 2)
    assert not failed.auto_succeeded
    for order_id in (team.seats[0].order_id, friend.order_id):
        assert (await engine.orders.get(order_id)).state is OrderState.REFUNDED
    assert (await engine.orders.get(held.order_id)).state is OrderState.EXPIRED
    assert await abc(engine) == (100, 0, 0)
    stats = await flushed_stats(engine)
    assert stats.teams is not None
    assert (stats.teams.failed, stats.teams.auto_succeeded, stats.teams.succeeded) == (1, 0, 0)
    await assert_invariants(engine, CID)


async def test_a_team_with_every_seat_paid_succeeds_at_once_not_automatically(
    engine: Engine,
) -> None:
    await start(engine, team_size=3, auto_success_min_paid=2)
    team = await full_team(engine, "leader", ("a", "b"))
    assert (team.state, team.why, team.paid) == (TeamState.SUCCEEDED, None, 3)
    assert not team.auto_succeeded
    assert await reap_twice(engine) == 0
    view = await engine.teams.view(team.team_id)
    assert (view.share_state, view.auto_succeeded) == (ShareState.SUCCEEDED, False)
    stats = await flushed_stats(engine)
    assert stats.teams is not None
    assert (stats.teams.succeeded, stats.teams.filled, stats.teams.auto_succeeded) == (1, 1, 0)
    assert stats.teams.mean_time_to_fill_s is not None
    await assert_invariants(engine, CID)


async def test_the_share_view_says_an_expired_team_succeeds_before_the_reaper_runs(
    engine: Engine,
) -> None:
    await start(engine, team_size=3, auto_success_min_paid=2)
    team = await open_paid_team(engine, "leader")
    await pay(engine, await join(engine, team.team_id, "friend"))
    assert (await engine.teams.view(team.team_id)).share_state is ShareState.OPEN
    await age_team(engine, team.team_id, AGE_TEAM)
    before = await engine.teams.view(team.team_id, "someone")
    assert before.team.state is TeamState.OPEN  # the reaper has not run
    assert (before.share_state, before.auto_succeeded) == (ShareState.SUCCEEDED, True)
    assert not before.viewer_can_join
    await reap_twice(engine)
    after = await engine.teams.view(team.team_id, "someone")
    assert after.team.state is TeamState.SUCCEEDED
    assert (after.share_state, after.auto_succeeded) == (ShareState.SUCCEEDED, True)


async def test_a_seat_whose_hold_ran_out_first_is_released_and_the_team_still_succeeds(
    engine: Engine,
) -> None:
    await start(engine, team_size=4, auto_success_min_paid=2)
    team = await open_paid_team(engine, "leader")
    await pay(engine, await join(engine, team.team_id, "friend"))
    walked_off = await join(engine, team.team_id, "walked-off")
    await age_order(engine, walked_off.order_id, AGE_HOLD)
    assert await reap_twice(engine) == 1  # the seat: released, the team still open
    released = await engine.orders.get(walked_off.order_id)
    assert released.state is OrderState.EXPIRED
    (event,) = await order_events(engine, walked_off.order_id, "order.expired")
    assert event["reason"] == "deadline"
    assert (await engine.teams.get(team.team_id)).state is TeamState.OPEN

    await age_team(engine, team.team_id, AGE_TEAM)
    assert await reap_twice(engine) == 1
    done = await engine.teams.get(team.team_id)
    assert (done.state, done.why, done.paid, len(done.seats)) == (TeamState.SUCCEEDED, "auto", 2, 2)
    await flushed_stats(engine)
    await assert_invariants(engine, CID)


async def test_invalidation_fails_open_teams_even_with_enough_paid_seats(engine: Engine) -> None:
    """Automatic success is for a team's expiry only: an invalidated campaign's open teams
    fail (and refund) whatever their paid seats, expired or not; succeeded teams stand."""
    await start(engine, team_size=4, auto_success_min_paid=2)
    running = await open_paid_team(engine, "lead-a")
    await pay(engine, await join(engine, running.team_id, "a-friend"))
    expired = await open_paid_team(engine, "lead-b")
    await pay(engine, await join(engine, expired.team_id, "b-friend"))
    b_held = await join(engine, expired.team_id, "b-held")
    await age_team(engine, expired.team_id, AGE_TEAM)
    filled = await full_team(engine, "lead-c", ("c1", "c2", "c3"))

    await engine.campaigns.invalidate(CID)
    assert await reap_twice(engine) == 0  # the cascade ended everything already

    for team_id in (running.team_id, expired.team_id):
        failed = await engine.teams.get(team_id)
        assert (failed.state, failed.why) == (TeamState.FAILED, "invalidated")
        for seat in failed.seats:
            state = (await engine.orders.get(seat.order_id)).state
            assert state in (OrderState.REFUNDED, OrderState.CANCELLED)
        view = await engine.teams.view(team_id)
        assert (view.share_state, view.auto_succeeded) == (
            ShareState.CAMPAIGN_INVALIDATED,
            False,
        )
    assert (await engine.orders.get(b_held.order_id)).state is OrderState.CANCELLED
    assert (await engine.teams.get(filled.team_id)).state is TeamState.SUCCEEDED
    assert await abc(engine) == (96, 0, 4)
    stats = await flushed_stats(engine)
    assert stats.teams is not None
    assert (stats.teams.failed, stats.teams.auto_succeeded, stats.teams.filled) == (2, 0, 1)
    await assert_invariants(engine, CID)


async def test_orders_of_a_team_that_succeeded_automatically_refund_after_sale(
    engine: Engine,
) -> None:
    await start(engine, team_size=3, auto_success_min_paid=2)
    team = await open_paid_team(engine, "leader")
    friend = await pay(engine, await join(engine, team.team_id, "friend"))
    await age_team(engine, team.team_id, AGE_TEAM)
    await reap_twice(engine)
    refunded = await engine.orders.refund(friend.order_id, restock=True)
    assert refunded.state is OrderState.REFUNDED
    kept = await engine.orders.refund(team.seats[0].order_id, restock=False)
    assert kept.state is OrderState.REFUNDED
    assert await engine.orders.refund(friend.order_id, restock=False) == refunded  # a retry
    assert await abc(engine) == (99, 0, 0)
    done = await engine.teams.get(team.team_id)
    assert (done.state, done.why, done.paid) == (TeamState.SUCCEEDED, "auto", 2)
    stats = await flushed_stats(engine)
    (item,) = stats.items
    assert (item.gmv, item.refunds, item.paid_orders) == (0, 2, 0)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- leader price


async def test_the_leader_pays_the_leader_price_and_every_member_the_price(
    engine: Engine,
) -> None:
    await start(engine, limit=4, leader_price=LEADER_PRICE)
    opened = await open_team(engine, "leader", qty=2)
    assert opened.order.amount == 2 * LEADER_PRICE
    (reserved,) = await order_events(engine, opened.order.order_id, "order.reserved")
    assert Order.from_record(opened.order.order_id, reserved["record"]).amount == 2 * LEADER_PRICE
    paid = await pay(engine, opened.order)
    assert paid.amount == 2 * LEADER_PRICE
    member = await join(engine, opened.team.team_id, "member")
    assert (member.qty, member.amount) == (2, 2 * PRICE)
    seated = await engine.teams.quick_join(CID, "quick", SKU, "q1")
    assert not seated.opened and seated.order.amount == 2 * PRICE
    # No team left to join: quick-join opens a one-unit team, its leader at the leader price.
    leads = await engine.teams.quick_join(CID, "solo", SKU, "q1")
    assert leads.opened and leads.order.amount == LEADER_PRICE
    retry = await engine.teams.open(CID, "leader", SKU, 2, "open-leader-sku-1-2")
    assert retry.replayed and retry.order.amount == 2 * LEADER_PRICE
    await assert_invariants(engine, CID)


async def test_a_free_leader_price_is_a_zero_amount(engine: Engine) -> None:
    await start(engine, leader_price=0)
    opened = await open_team(engine, "leader")
    assert opened.order.amount == 0
    assert (await pay(engine, opened.order)).amount == 0
    await assert_invariants(engine, CID)


async def test_leader_price_amounts_through_success_failure_and_refunds_reach_sql(
    engine: Engine,
) -> None:
    """A team that fills, one that fails at expiry and an after-sale refund: every amount is
    the leader price for leaders and the price for members, in Redis and SQL; GMV counts the
    paid amounts only."""
    await start(engine, team_size=3, leader_price=LEADER_PRICE)
    filled = await full_team(engine, "lead-a", ("a1", "a2"))
    failing = await open_paid_team(engine, "lead-b")
    b_member = await pay(engine, await join(engine, failing.team_id, "b1"))
    await age_team(engine, failing.team_id, AGE_TEAM)
    assert await reap_twice(engine) == 1
    refunded = await engine.orders.refund(filled.seats[1].order_id, restock=True)
    assert refunded.amount == PRICE

    stats = await flushed_stats(engine)
    orders = await sql_orders(engine)
    leaders = {filled.seats[0].order_id, failing.seats[0].order_id}
    for order_id, order in orders.items():
        unit = LEADER_PRICE if order_id in leaders else PRICE
        assert order.amount == order.qty * unit, order
    assert orders[failing.seats[0].order_id].state is OrderState.REFUNDED
    assert orders[b_member.order_id].state is OrderState.REFUNDED
    (item,) = stats.items
    assert item.gmv == LEADER_PRICE + PRICE  # filled: leader + a2 (a1 refunded)
    assert item.paid_orders == 2
    assert item.average_order_value == (LEADER_PRICE + PRICE) / 2
    await assert_invariants(engine, CID)


async def test_leader_price_orders_on_invalidation(engine: Engine) -> None:
    await start(engine, leader_price=LEADER_PRICE)
    pending = await open_team(engine, "pending-lead")
    running = await open_paid_team(engine, "open-lead")
    await engine.campaigns.invalidate(CID)
    assert await reap_twice(engine) == 0
    cancelled = await engine.orders.get(pending.order.order_id)
    assert (cancelled.state, cancelled.amount) == (OrderState.CANCELLED, LEADER_PRICE)
    refund = await engine.orders.get(running.seats[0].order_id)
    assert (refund.state, refund.amount) == (OrderState.REFUNDED, LEADER_PRICE)
    assert (await engine.teams.get(pending.team.team_id)).state is TeamState.DISSOLVED
    stats = await flushed_stats(engine)
    assert stats.items[0].gmv == 0
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- per-order cap


async def test_the_per_order_cap_refuses_a_bigger_team_and_leaves_no_trace(
    engine: Engine,
) -> None:
    await start(engine, limit=3, per_order_limit=1)
    with pytest.raises(OrderLimitExceeded) as caught:
        await engine.teams.open(CID, "leader", SKU, 2, "k1")
    assert caught.value.details == {"per_order_limit": 1}
    assert await engine.runtime.redis.hlen(KEYS.teams) == 0
    assert await engine.runtime.redis.xlen(KEYS.events) == 0
    assert (await abc(engine), await units_of(engine, "leader")) == ((100, 0, 0), 0)
    team = await engine.teams.open(CID, "leader", SKU, 1, "k1")  # the key is still free
    assert (team.order.qty, team.team.qty, team.replayed) == (1, 1, False)
    await assert_invariants(engine, CID)


async def test_at_most_one_unit_per_order_and_three_per_user_across_teams(
    engine: Engine,
) -> None:
    """The shopper leads one team, joins another, quick-joins a third: 3 units in 3 orders;
    a fourth seat is over the per-user total, a two-unit team over the per-order cap."""
    await start(engine, limit=3, per_order_limit=1)
    other = await open_paid_team(engine, "other-lead")
    third = await open_paid_team(engine, "third-lead")
    await join(engine, third.team_id, "filler")  # third has 1 seat left: quick-join's pick
    mine = await open_team(engine, "shopper")
    await join(engine, other.team_id, "shopper")
    quick = await engine.teams.quick_join(CID, "shopper", SKU, "q1")
    assert quick.team.team_id == third.team_id and not quick.opened
    assert await units_of(engine, "shopper") == 3
    with pytest.raises(LimitExceeded) as limit:
        await engine.teams.quick_join(CID, "shopper", SKU, "q2")
    assert limit.value.details == {"units_left": 0}
    with pytest.raises(OrderLimitExceeded):
        await engine.teams.open(CID, "shopper", SKU, 2, "k2")
    # A hold that ends frees its unit: the shopper may take a seat again.
    await age_order(engine, mine.order.order_id, AGE_HOLD)
    assert await reap_twice(engine) == 1
    again = await engine.teams.quick_join(CID, "shopper", SKU, "q2")
    assert again.order.qty == 1 and await units_of(engine, "shopper") == 3
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- all together


async def test_every_option_together_with_expiry_refunds_and_two_reapers(
    engine: Engine,
) -> None:
    """Teams of 3, automatic success from 2 paid seats, the leader at 490 instead of 990, at
    most 1 unit per order and 2 per user: one team fills, one succeeds automatically, one
    fails, one is dissolved, and an after-sale refund follows; every amount, state and KPI
    is right in Redis and SQL."""
    await start(
        engine,
        team_size=3,
        limit=2,
        stock=20,
        per_order_limit=1,
        auto_success_min_paid=2,
        leader_price=LEADER_PRICE,
    )
    with pytest.raises(OrderLimitExceeded):
        await engine.teams.open(CID, "a", SKU, 2, "too-many")
    auto = await open_paid_team(engine, "a")
    await pay(engine, await join(engine, auto.team_id, "b"))
    auto_held = await join(engine, auto.team_id, "c")
    failing = await open_paid_team(engine, "d")
    failing_held = await join(engine, failing.team_id, "e")
    filled = await full_team(engine, "f", ("g", "h"))
    dissolving = await open_team(engine, "i")
    assert await abc(engine) == (11, 3, 6)

    for team in (auto, failing):
        await age_team(engine, team.team_id, AGE_TEAM)
    await age_order(engine, dissolving.order.order_id, AGE_HOLD)
    assert await reap_twice(engine) == 3  # two teams, one leader's hold

    states = {
        team_id: (t.state, t.why, t.paid)
        for team_id in (auto.team_id, failing.team_id, filled.team_id, dissolving.team.team_id)
        if (t := await engine.teams.get(team_id))
    }
    assert states == {
        auto.team_id: (TeamState.SUCCEEDED, "auto", 2),
        failing.team_id: (TeamState.FAILED, "expired", 1),
        filled.team_id: (TeamState.SUCCEEDED, None, 3),
        dissolving.team.team_id: (TeamState.DISSOLVED, "leader_unpaid", 0),
    }
    assert (await engine.orders.get(auto_held.order_id)).state is OrderState.EXPIRED
    assert (await engine.orders.get(failing_held.order_id)).state is OrderState.EXPIRED
    leader_refund = await engine.orders.refund(filled.seats[0].order_id, restock=False)
    assert (leader_refund.state, leader_refund.amount) == (OrderState.REFUNDED, LEADER_PRICE)
    assert await abc(engine) == (15, 0, 4)  # a, b, g, h paid; f's unit left the sale
    assert await engine.reaper.expire_campaign(CID) == (0, False)
    await assert_invariants(engine, CID)

    stats = await flushed_stats(engine)
    orders = await sql_orders(engine)
    leaders = {t.seats[0].order_id for t in (auto, failing, filled)} | {dissolving.order.order_id}
    for order_id, order in orders.items():
        assert order.qty == 1
        assert order.amount == (LEADER_PRICE if order_id in leaders else PRICE), order
    paid = [o for o in orders.values() if o.state is OrderState.PAID]
    assert sorted(o.user_id for o in paid) == ["a", "b", "g", "h"]
    (item,) = stats.items
    assert item.gmv == sum(o.amount for o in paid) == LEADER_PRICE + 3 * PRICE
    teams = stats.teams
    assert teams is not None
    assert (teams.created, teams.succeeded, teams.filled, teams.auto_succeeded) == (4, 2, 1, 1)
    assert (teams.auto_unfilled_seats, teams.failed, teams.dissolved) == (1, 1, 1)
    assert teams.success_rate == pytest.approx(2 / 3)
    sql_teams = {t.team_id: t for t in await engine.runtime.store.campaign_teams(CID)}
    assert sql_teams[auto.team_id].why == "auto"
    assert sql_teams[auto.team_id] == await engine.teams.get(auto.team_id)


async def test_every_option_together_with_invalidation(engine: Engine) -> None:
    await start(
        engine,
        team_size=3,
        limit=2,
        per_order_limit=1,
        auto_success_min_paid=2,
        leader_price=LEADER_PRICE,
    )
    eligible = await open_paid_team(engine, "a")
    await pay(engine, await join(engine, eligible.team_id, "b"))
    await age_team(engine, eligible.team_id, AGE_TEAM)  # expired, not reaped yet
    pending = await open_team(engine, "c")
    filled = await full_team(engine, "d", ("e", "f"))
    await engine.campaigns.invalidate(CID)
    assert await reap_twice(engine) == 0

    assert (await engine.teams.get(eligible.team_id)).state is TeamState.FAILED
    assert (await engine.teams.get(pending.team.team_id)).state is TeamState.DISSOLVED
    assert (await engine.teams.get(filled.team_id)).state is TeamState.SUCCEEDED
    stats = await flushed_stats(engine)
    orders = await sql_orders(engine)
    assert orders[eligible.seats[0].order_id].state is OrderState.REFUNDED
    assert orders[eligible.seats[0].order_id].amount == LEADER_PRICE
    assert orders[pending.order.order_id].amount == LEADER_PRICE
    (item,) = stats.items
    assert item.gmv == LEADER_PRICE + 2 * PRICE  # the filled team only
    assert stats.teams is not None and stats.teams.auto_succeeded == 0
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- min_pay_seconds


def time_to_pay_ms(order: Order) -> int:
    return int((order.expires_at - order.created_at).total_seconds() * 1000)


async def test_quick_join_and_the_joinable_list_skip_teams_about_to_expire(
    engine: Engine,
) -> None:
    """A team one seat from full but with 1 s left is not offered: quick-join seats the
    shopper in the team with time to pay, though it has more seats to fill; when no team
    leaves the time, quick-join opens a new one. An explicit join still may."""
    await start(engine, min_pay_seconds=20)
    closing = await open_paid_team(engine, "lead-a")
    await pay(engine, await join(engine, closing.team_id, "a1"))  # one seat left
    fresh = await open_paid_team(engine, "lead-b")  # two seats left
    await age_team(engine, closing.team_id, TTL_MS - 1_000)  # 1 s left
    assert await joinable_ids(engine) == [fresh.team_id]
    seat = await engine.teams.quick_join(CID, "q1", SKU, "quick-1")
    assert (seat.team.team_id, seat.opened) == (fresh.team_id, False)
    assert time_to_pay_ms(seat.order) == HOLD_MS  # the hold, not cut by the team's expiry
    await age_team(engine, fresh.team_id, TTL_MS - 19_000)  # 19 s left: under the minimum
    assert await joinable_ids(engine) == []
    opened = await engine.teams.quick_join(CID, "q2", SKU, "quick-2")
    assert opened.opened and opened.team.team_id not in (closing.team_id, fresh.team_id)
    late = await join(engine, closing.team_id, "late")  # a shared link still works
    assert 0 < time_to_pay_ms(late) <= 1_000
    await assert_invariants(engine, CID)


async def test_the_default_minimum_time_to_pay(engine: Engine) -> None:
    """Unset: 30 s (teams of 600 s, holds of 60 s); at most half a short team's life, never
    more than the hold; 0 offers any team with time left."""
    campaign = await start(engine)
    assert campaign.min_pay_seconds is None and campaign.quick_join_min_ms == 30_000
    team = await open_paid_team(engine, "lead")
    await age_team(engine, team.team_id, TTL_MS - 31_000)
    assert await joinable_ids(engine) == [team.team_id]
    await age_team(engine, team.team_id, 2_000)  # 29 s left
    assert await joinable_ids(engine) == []
    now = await engine.runtime.now()
    assert team_campaign(now, team_ttl_seconds=20).quick_join_min_ms == 10_000
    assert team_campaign(now, hold_seconds=5).quick_join_min_ms == 5_000
    assert team_campaign(now, min_pay_seconds=0).quick_join_min_ms == 0


@pytest.mark.parametrize("seconds", [601, -1])
async def test_min_pay_seconds_is_validated(engine: Engine, seconds: int) -> None:
    now = await engine.runtime.now()
    with pytest.raises(ValidationError, match="min_pay_seconds must be an integer from 0 to 600"):
        team_campaign(now, min_pay_seconds=seconds)
    with pytest.raises(ValidationError, match="belongs to team campaigns only"):
        dataclasses.replace(flash_campaign(now), min_pay_seconds=30)


async def test_no_quick_join_seat_has_less_than_the_minimum_time_to_pay(
    engine: Engine,
) -> None:
    """A team sale whose teams run out of time at every moment: 40 open teams with 0.1 to
    40 s left and one to two seats free, 120 quick-joins in waves (the reaper ending what
    expires in between): every seat taken in an existing team leaves at least the minimum
    (20 s) to pay, and so does every team the joinable list offers."""
    await start(engine, min_pay_seconds=20, team_size=4, stock=1_000, limit=1)
    rng = random.Random(29)
    for n in range(40):
        team = await open_paid_team(engine, f"lead{n}")
        if rng.random() < 0.5:
            await pay(engine, await join(engine, team.team_id, f"mate{n}"))
        await age_team(engine, team.team_id, TTL_MS - rng.randint(100, 40_000))
    seats = []
    for wave in range(6):
        now = await engine.runtime.now()
        offered = await engine.teams.joinable(CID, SKU, limit=100)
        assert all(t.expires_at is not None for t in offered)
        assert all((t.expires_at - now).total_seconds() >= 20 for t in offered if t.expires_at)
        seats += await asyncio.gather(
            *(engine.teams.quick_join(CID, f"w{wave}s{n}", SKU, "q") for n in range(20))
        )
        await engine.reaper.expire_campaign(CID)
    joined = [s for s in seats if not s.opened]
    assert len(joined) > 20  # existing teams were offered, not only new ones
    assert all(time_to_pay_ms(s.order) >= 20_000 for s in joined)
    await assert_invariants(engine, CID)
