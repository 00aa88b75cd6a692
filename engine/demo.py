"""`flashteam demo`: a simulated flash sale and team sale on a private Redis, with verdicts.

Flash: shoppers rush one item the moment the sale opens. Some pay, some cancel, the rest
abandon their hold; the reaper returns abandoned stock when the holds expire and a second
wave buys it. Team: shoppers arrive in waves and quick-join teams of three; some never pay,
so some teams never fill. The team deal uses the merchant options
(docs/lifecycle.md#team-deal-options): a leader price, one unit per order, and automatic
success of a team whose time runs out with two paid seats; a team with fewer fails and its
paid leader is refunded; teams whose leader never pays are dissolved. The demo prints what
sold, expired, failed and was refunded, the teams by outcome, the GMV, rejections by reason
and the invariant checks, and exits non-zero when any check fails.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from engine.audit import audit_campaign
from engine.core import Engine
from engine.errors import Rejected
from engine.models import Campaign, CampaignKind, Item, OrderState
from engine.stats import campaign_stats
from engine.worker import FlushWorker

_CONCURRENCY = 512
_REAPER_SLACK = 0.3


@dataclass(frozen=True, slots=True)
class DemoPlan:
    """The simulated sale's size and shopper behaviour."""

    shoppers: int = 20_000
    stock: int = 1_000
    limit: int = 2
    pay_rate: float = 0.6
    cancel_rate: float = 0.1
    hold_seconds: int = 1
    seed: int = 7
    team_shoppers: int = 5_000
    team_size: int = 3
    team_ttl_seconds: int = 2
    team_batch: int = 100  # shoppers arriving together; the next batch sees the teams opened
    team_price: int = 3_990
    leader_price: int = 2_990  # the team leader's price (a team deal option)
    auto_success_min_paid: int = 2  # a team out of time with this many paid seats succeeds


@dataclass(slots=True)
class _Tally:
    rejections: Counter[str]
    outcomes: Counter[str]


async def _shop(
    engine: Engine, plan: DemoPlan, rng: random.Random, user: str, wave: int, tally: _Tally
) -> None:
    qty = rng.choice((1, 1, 1, 2)) if plan.limit >= 2 else 1
    try:
        held = await engine.flash.reserve("demo-flash", user, "phone", qty, f"w{wave}")
    except Rejected as exc:
        tally.rejections[exc.code] += 1
        return
    order_id = held.order.order_id
    roll = rng.random()
    try:
        if roll < plan.pay_rate:
            await engine.orders.pay(order_id, user, f"pay-{order_id}")
            tally.outcomes["paid"] += 1
        elif roll < plan.pay_rate + plan.cancel_rate:
            await engine.orders.cancel(order_id, user)
            tally.outcomes["cancelled"] += 1
        else:
            tally.outcomes["abandoned"] += 1
    except Rejected as exc:
        tally.rejections[f"{exc.code} (at payment)"] += 1


async def _wave(engine: Engine, plan: DemoPlan, users: list[str], wave: int, tally: _Tally) -> None:
    rng = random.Random(plan.seed + wave)
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(user: str) -> None:
        async with gate:
            await _shop(engine, plan, rng, user, wave, tally)

    await asyncio.gather(*(one(user) for user in users))


async def _let_holds_expire(engine: Engine, plan: DemoPlan, seconds: float = 0) -> None:
    """Wait out the hold time (the background reaper works meanwhile), then one last pass so
    every hold whose deadline has passed is ended before the next wave."""
    await asyncio.sleep(seconds or plan.hold_seconds + _REAPER_SLACK)
    await engine.reaper.run_once()


async def run_demo(engine: Engine, plan: DemoPlan, out: list[str]) -> bool:
    """Run both simulated sales, append the report lines to ``out``; True when all hold."""
    stop = asyncio.Event()
    reaper = asyncio.create_task(engine.reaper.run(stop))
    try:
        flash_ok = await _flash_sale(engine, plan, out)
        out.append("")
        team_ok = await _team_sale(engine, plan, out)
    finally:
        stop.set()
        await reaper
    return flash_ok and team_ok


async def _flash_sale(engine: Engine, plan: DemoPlan, out: list[str]) -> bool:
    now = await engine.runtime.now()
    await engine.campaigns.create(
        Campaign(
            id="demo-flash",
            kind=CampaignKind.FLASH,
            title="Demo flash sale",
            starts_at=now + timedelta(milliseconds=300),
            ends_at=now + timedelta(minutes=10),
            items=(Item("phone", 49_900, plan.stock),),
            per_user_limit=plan.limit,
            hold_seconds=plan.hold_seconds,
        )
    )
    users = [f"shopper-{n}" for n in range(plan.shoppers)]
    tally = _Tally(Counter(), Counter())
    await _wave(engine, plan, users[:50], 0, tally)  # too early: they get not_started
    await asyncio.sleep(0.4)
    await _wave(engine, plan, users, 1, tally)
    await _let_holds_expire(engine, plan)
    await _wave(engine, plan, users[::4], 2, tally)  # a second wave buys the returned stock
    await _let_holds_expire(engine, plan)
    return await _report(engine, plan, tally, out)


async def _report(engine: Engine, plan: DemoPlan, tally: _Tally, out: list[str]) -> bool:
    view = await engine.campaigns.get("demo-flash")
    stock = view.stock[0]
    audit = await audit_campaign(engine.runtime, "demo-flash")
    units = audit.units
    no_oversell = stock.paid + stock.held <= plan.stock and stock.available >= 0
    out += [
        f"flash sale: {plan.shoppers} shoppers, {plan.stock} units, limit {plan.limit} per user",
        f"  sold (paid)   {units.get(OrderState.PAID, 0):>7} units in "
        f"{audit.orders.get(OrderState.PAID, 0)} orders",
        f"  held          {units.get(OrderState.HELD, 0):>7} units",
        f"  expired       {units.get(OrderState.EXPIRED, 0):>7} units "
        f"(abandoned holds returned by the reaper)",
        f"  cancelled     {units.get(OrderState.CANCELLED, 0):>7} units",
        f"  available     {stock.available:>7} units left",
        "  rejections by reason:",
        *_rejection_lines(tally),
        f"  no oversell: paid {stock.paid} + held {stock.held} <= stock {plan.stock}: "
        f"{'OK' if no_oversell else 'FAILED'}",
        f"  invariants I1, I2 (stock, limits; docs/invariants.md): "
        f"{'OK' if audit.ok else 'FAILED'}",
        *(f"    violation: {v}" for v in audit.violations),
    ]
    return no_oversell and audit.ok


async def _team_shopper(
    engine: Engine, plan: DemoPlan, rng: random.Random, user: str, tally: _Tally
) -> None:
    try:
        seat = await engine.teams.quick_join("demo-team", user, "fruit-box", "q")
    except Rejected as exc:
        tally.rejections[exc.code] += 1
        return
    tally.outcomes["opened" if seat.opened else "joined"] += 1
    # Leaders mostly pay (or the team is dissolved); members a little less often.
    if rng.random() < (0.85 if seat.opened else plan.pay_rate + 0.15):
        try:
            await engine.orders.pay(seat.order.order_id, user, f"pay-{seat.order.order_id}")
        except Rejected as exc:
            tally.rejections[f"{exc.code} (at payment)"] += 1


async def _team_sale(engine: Engine, plan: DemoPlan, out: list[str]) -> bool:
    now = await engine.runtime.now()
    await engine.campaigns.create(
        Campaign(
            id="demo-team",
            kind=CampaignKind.TEAM,
            title="Demo team deal",
            starts_at=now,
            ends_at=now + timedelta(minutes=10),
            items=(Item("fruit-box", plan.team_price, plan.team_shoppers, plan.leader_price),),
            per_user_limit=1,
            per_order_limit=1,
            hold_seconds=plan.hold_seconds,
            team_size=plan.team_size,
            team_ttl_seconds=plan.team_ttl_seconds,
            auto_success_min_paid=plan.auto_success_min_paid,
        )
    )
    rng = random.Random(plan.seed)
    tally = _Tally(Counter(), Counter())

    async def one(user: str) -> None:
        await _team_shopper(engine, plan, rng, user, tally)

    users = [f"buyer-{n}" for n in range(plan.team_shoppers)]
    for start in range(0, len(users), plan.team_batch):
        await asyncio.gather(*(one(user) for user in users[start : start + plan.team_batch]))
    await _let_holds_expire(engine, plan, plan.team_ttl_seconds + _REAPER_SLACK)
    return await _team_report(engine, plan, tally, out)


async def _team_report(engine: Engine, plan: DemoPlan, tally: _Tally, out: list[str]) -> bool:
    await FlushWorker(engine.runtime).drain()  # the KPIs are read from SQL
    audit = await audit_campaign(engine.runtime, "demo-team")
    stats = await campaign_stats(engine.runtime, await engine.campaigns.get("demo-team"))
    kpis, gmv = stats.teams, stats.items[0].gmv
    assert kpis is not None  # a team campaign
    paid = audit.orders.get(OrderState.PAID, 0)
    # Every succeeded team's seats were paid but the ones its automatic success lacked; its
    # leader paid the leader price, every other paid seat the team price.
    seats_ok = paid == plan.team_size * kpis.succeeded - kpis.auto_unfilled_seats
    gmv_ok = gmv == kpis.succeeded * plan.leader_price + (paid - kpis.succeeded) * plan.team_price
    rate = f"{100 * kpis.success_rate:.1f}%" if kpis.success_rate is not None else "n/a"
    out += [
        f"team sale: {plan.team_shoppers} shoppers quick-joining teams of {plan.team_size} "
        f"(team time {plan.team_ttl_seconds} s, leader price {plan.leader_price}, "
        f"automatic success from {plan.auto_success_min_paid} paid seats)",
        f"  teams created {kpis.created:>7}",
        f"  opened        {kpis.opened:>7} (leader paid)",
        f"  succeeded     {kpis.succeeded:>7} (success rate {rate})",
        f"    full        {kpis.filled:>7}",
        f"    automatic   {kpis.auto_succeeded:>7} (time ran out with "
        f"{plan.auto_success_min_paid}+ paid: {kpis.auto_unfilled_seats} seats given)",
        f"  failed        {kpis.failed:>7} (time ran out: the paid leader refunded)",
        f"  dissolved     {kpis.dissolved:>7} (leader never paid)",
        f"  refunds       {audit.orders.get(OrderState.REFUNDED, 0):>7} orders refunded",
        f"  paid orders   {paid:>7} (= seats of succeeded teams: {'OK' if seats_ok else 'NO'})",
        f"  GMV           {gmv:>7} (leaders at {plan.leader_price}, members at "
        f"{plan.team_price}: {'OK' if gmv_ok else 'NO'})",
        "  rejections by reason:",
        *_rejection_lines(tally),
        f"  invariants I1-I3 (stock, limits, no over-filled team; docs/invariants.md): "
        f"{'OK' if audit.ok else 'FAILED'}",
        *(f"    violation: {v}" for v in audit.violations),
    ]
    return audit.ok and seats_ok and gmv_ok


def _rejection_lines(tally: _Tally) -> list[str]:
    lines = [f"    {reason:<28} {n:>7}" for reason, n in sorted(tally.rejections.items())]
    return lines or ["    none"]
