"""Team-join under real concurrency (docs/lifecycle.md#team; invariants I3 and I5,
docs/invariants.md): asyncio.gather against a real redis-server, and the last-seat race and
quick_join also against a real 3-master Redis Cluster. Nothing here sleeps: every race is a gather,
and time moves with age_order/age_team.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from engine import (
    AlreadyInTeam,
    Engine,
    Invalidated,
    InvalidState,
    Order,
    OrderState,
    TeamClosed,
    TeamFull,
)
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import Team, TeamSeatResult, TeamState
from engine.reconcile import reconcile
from engine.stats import campaign_stats
from engine.worker import FlushWorker
from testkit.factories import make_settings, team_campaign
from testkit.helpers import age_order, age_team, assert_invariants

SKU = "sku-1"
TTL_MS = 600_000
HOLD_MS = 60_000

Entry = dict[str, str]


# --------------------------------------------------------------------------- helpers


async def start(engine: Engine, campaign_id: str, **options: Any) -> None:
    await engine.campaigns.create(team_campaign(await engine.runtime.now(), campaign_id, **options))


async def pay(engine: Engine, order: Order) -> Order:
    return await engine.orders.pay(order.order_id, order.user_id, f"pay-{order.order_id}")


async def paid_team(engine: Engine, campaign_id: str, leader: str) -> Team:
    """A team whose leader paid: open and joinable."""
    opened = await engine.teams.open(campaign_id, leader, SKU, 1, f"open-{leader}")
    await pay(engine, opened.order)
    return await engine.teams.get(opened.team.team_id)


async def join(engine: Engine, team_id: str, user: str) -> Order:
    return (await engine.teams.join(team_id, user, f"join-{user}-{team_id}")).order


async def events(engine: Engine, campaign_id: str) -> list[Entry]:
    entries: Any = await engine.runtime.redis.xrange(keys_of(campaign_id).events)
    return [dict(fields) for _, fields in entries]


async def all_teams(engine: Engine, campaign_id: str) -> list[Team]:
    records: Any = await engine.runtime.redis.hgetall(keys_of(campaign_id).teams)
    return [Team.from_record(team_id, raw) for team_id, raw in records.items()]


async def all_orders(engine: Engine, campaign_id: str) -> dict[str, Order]:
    records: Any = await engine.runtime.redis.hgetall(keys_of(campaign_id).orders)
    return {order_id: Order.from_record(order_id, raw) for order_id, raw in records.items()}


async def stock(engine: Engine, campaign_id: str) -> tuple[int, int, int, int]:
    """(initial, available, held, paid) units of the campaign's one item."""
    (item,) = (await engine.campaigns.get(campaign_id)).stock
    return item.initial, item.available, item.held, item.paid


def outcomes(results: Sequence[object]) -> Counter[str]:
    return Counter(type(result).__name__ for result in results)


# --------------------------------------------------------------------------- last seat


async def test_last_seat_race_seats_exactly_one_of_200(any_engine: Engine) -> None:
    engine = any_engine
    await start(engine, "race", team_size=3, stock=1_000, limit=1)
    team = await paid_team(engine, "race", "leader")
    await join(engine, team.team_id, "second")  # 2 of 3 seats taken

    results = await asyncio.gather(
        *(engine.teams.join(team.team_id, f"u{n}", f"k{n}") for n in range(200)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, TeamSeatResult)]
    assert outcomes(results) == {"TeamSeatResult": 1, "TeamFull": 199}, outcomes(results)
    assert all(isinstance(r, TeamSeatResult | TeamFull) for r in results)
    (winner,) = winners
    assert winner.order.state is OrderState.HELD and winner.team.team_id == team.team_id

    full = await engine.teams.get(team.team_id)
    assert (full.held, full.paid, full.remaining) == (2, 1, 0)
    users = [seat.user_id for seat in full.seats]
    assert users == ["leader", "second", winner.order.user_id]
    assert await stock(engine, "race") == (1_000, 997, 2, 1)
    assert len(await all_orders(engine, "race")) == 3
    assert await engine.teams.joinable("race", SKU) == []
    await assert_invariants(engine, "race")

    for seat in full.seats[1:]:
        order = await engine.orders.get(seat.order_id)
        await pay(engine, order)
    done = await engine.teams.get(team.team_id)
    assert (done.state, done.paid, done.held) == (TeamState.SUCCEEDED, 3, 0)
    await assert_invariants(engine, "race")


async def test_one_user_joining_50_times_holds_one_seat(engine: Engine) -> None:
    await start(engine, "eager", team_size=3, limit=10)
    team = await paid_team(engine, "eager", "leader")

    results = await asyncio.gather(
        *(engine.teams.join(team.team_id, "eager-user", f"k{n}") for n in range(50)),
        *(engine.teams.join(team.team_id, "leader", f"lead-{n}") for n in range(10)),
        return_exceptions=True,
    )
    assert outcomes(results) == {"TeamSeatResult": 1, "AlreadyInTeam": 59}, outcomes(results)
    assert all(isinstance(r, AlreadyInTeam) for r in results[50:]), "the leader got a seat"
    (seat,) = [r for r in results if isinstance(r, TeamSeatResult)]
    assert seat.order.user_id == "eager-user"

    current = await engine.teams.get(team.team_id)
    assert [s.user_id for s in current.seats] == ["leader", "eager-user"]
    assert (current.held, current.paid, current.remaining) == (1, 1, 1)
    assert int(await engine.runtime.redis.hget(keys_of("eager").users, "eager-user") or 0) == 1
    assert await stock(engine, "eager") == (100, 98, 1, 1)
    await assert_invariants(engine, "eager")


# --------------------------------------------------------------------------- two reapers


async def _team_with_paid_and_held_seats(engine: Engine, n: int) -> tuple[Team, list[Order]]:
    team = await paid_team(engine, "reap", f"lead-{n}")
    paid_member = await pay(engine, await join(engine, team.team_id, f"paid-{n}"))
    held_member = await join(engine, team.team_id, f"held-{n}")
    return team, [paid_member, held_member]


async def test_two_reapers_fail_each_expired_team_exactly_once(
    engine: Engine, redis_server: RedisServer, tmp_path: Path
) -> None:
    await start(engine, "reap", team_size=4, stock=500, limit=1)
    built = await asyncio.gather(*(_team_with_paid_and_held_seats(engine, n) for n in range(50)))
    teams = [team for team, _ in built]
    paid_ids = {team.seats[0].order_id for team in teams} | {
        members[0].order_id for _, members in built
    }
    held_ids = {members[1].order_id for _, members in built}
    assert len(paid_ids) == 100 and len(held_ids) == 50
    assert await stock(engine, "reap") == (500, 350, 50, 100)

    await asyncio.gather(*(age_team(engine, team.team_id, TTL_MS + 1_000) for team in teams))
    # Half the held seats also passed their own payment deadline: expire_orders and
    # expire_teams then compete for them across the two reapers.
    rng = random.Random(5)
    aged_seats = rng.sample(sorted(held_ids), 25)
    await asyncio.gather(*(age_order(engine, oid, HOLD_MS + 1_000) for oid in aged_seats))

    # Two reaper processes with small batches, so their script calls interleave.
    reapers = []
    for name in ("a", "b"):
        settings = make_settings(redis_server.url, tmp_path / name, reaper_batch=3)
        reapers.append(await Engine.open(settings))
    try:
        ended = await asyncio.gather(*(r.reaper.expire_campaign("reap") for r in reapers))
    finally:
        for reaper in reapers:
            await reaper.close()

    stream = await events(engine, "reap")
    failed = Counter(e["team"] for e in stream if e["type"] == "team.failed")
    assert failed == Counter({team.team_id: 1 for team in teams}), "a team failed twice"
    refunded = Counter(e["order"] for e in stream if e["type"] == "order.refunded")
    assert refunded == Counter(dict.fromkeys(paid_ids, 1)), "a refund ran twice or not at all"
    assert {e["reason"] for e in stream if e["type"] == "order.refunded"} == {"team_failed"}
    expired = Counter(e["order"] for e in stream if e["type"] == "order.expired")
    assert expired == Counter(dict.fromkeys(held_ids, 1)), "a held seat ended twice"
    by_deadline = sum(
        1 for e in stream if e["type"] == "order.expired" and e["reason"] == "deadline"
    )
    assert sum(count for count, _ in ended) == 50 + by_deadline

    orders = await all_orders(engine, "reap")
    assert {orders[oid].state for oid in paid_ids} == {OrderState.REFUNDED}
    assert {orders[oid].state for oid in held_ids} == {OrderState.EXPIRED}
    current = await all_teams(engine, "reap")
    assert {(t.state, t.why) for t in current} == {(TeamState.FAILED, "expired")}
    assert await stock(engine, "reap") == (500, 500, 0, 0)
    assert await engine.reaper.expire_campaign("reap") == (0, False)
    await assert_invariants(engine, "reap")


# --------------------------------------------------------------------------- quick_join


async def _quick_round(engine: Engine, users: Sequence[str], round_no: int) -> list[TeamSeatResult]:
    results = await asyncio.gather(
        *(engine.teams.quick_join("quick", user, SKU, f"quick-{round_no}") for user in users)
    )
    for user, result in zip(users, results, strict=True):
        assert result.order.user_id == user and result.order.state is OrderState.HELD
    # Leaders first, so their teams are open when the members' payments arrive.
    leaders = [r.order for r in results if r.opened]
    members = [r.order for r in results if not r.opened]
    paid = await asyncio.gather(*(pay(engine, order) for order in leaders))
    paid += await asyncio.gather(*(pay(engine, order) for order in members))
    assert {order.state for order in paid} == {OrderState.PAID}
    return results


async def test_quick_join_2000_shoppers_fill_teams_exactly(any_engine: Engine) -> None:
    engine = any_engine
    await start(engine, "quick", team_size=3, stock=3_000, limit=1)
    users = [f"shopper-{n}" for n in range(2_000)]

    # Round 1: nobody is open yet, so every quick-joiner leads a new (pending) team.
    first = await _quick_round(engine, users[:500], 1)
    assert all(r.opened for r in first)
    assert len({r.team.team_id for r in first}) == 500
    # Round 2: 1,000 free seats in 500 open teams; the first 1,000 to run take them (fewest
    # remaining first fills team by team), the other 500 lead new teams.
    second = await _quick_round(engine, users[500:], 2)
    joined = [r for r in second if not r.opened]
    assert len(joined) == 1_000 and len(second) - len(joined) == 500
    assert {r.team.team_id for r in joined} == {r.team.team_id for r in first}

    teams = await all_teams(engine, "quick")
    assert len(teams) == 1_000
    by_state = Counter(team.state for team in teams)
    assert by_state == {TeamState.SUCCEEDED: 500, TeamState.OPEN: 500}
    seated: Counter[str] = Counter()
    for team in teams:
        members = [seat.user_id for seat in team.seats]
        assert len(members) == len(set(members)), f"{team.team_id}: a user sits twice"
        assert team.held + team.paid <= team.size and len(members) <= team.size
        if team.state is TeamState.SUCCEEDED:
            assert (team.paid, team.held, len(members)) == (3, 0, 3)
        else:
            assert (team.paid, team.held, len(members)) == (1, 0, 1)
        seated.update(members)
    assert seated == Counter(dict.fromkeys(users, 1)), "every shopper sits in exactly one team"

    orders = await all_orders(engine, "quick")
    assert len(orders) == 2_000
    assert {order.state for order in orders.values()} == {OrderState.PAID}
    assert await stock(engine, "quick") == (3_000, 1_000, 0, 2_000)
    assert len(await engine.teams.joinable("quick", SKU, limit=100)) == 100
    await assert_invariants(engine, "quick")


LEADER_PRICE = 490  # team_campaign's price is 990


async def _deal_round(
    engine: Engine, cid: str, users: Sequence[str], walks_off: set[str]
) -> list[TeamSeatResult]:
    """Everyone quick-joins at once; leaders pay first, then the members but ``walks_off``."""
    results = await asyncio.gather(
        *(engine.teams.quick_join(cid, user, SKU, "deal") for user in users)
    )
    await asyncio.gather(*(pay(engine, r.order) for r in results if r.opened))
    await asyncio.gather(
        *(
            pay(engine, r.order)
            for r in results
            if not r.opened and r.order.user_id not in walks_off
        )
    )
    return results


async def _amounts_in_sql(engine: Engine, cid: str, teams: Sequence[Team]) -> dict[str, Order]:
    """Flush the outbox; every order in SQL is the leader price for a team's leader, the
    price for every other seat, whatever its state; returns them."""
    await FlushWorker(engine.runtime).drain()
    assert (await reconcile(engine.runtime, cid)).ok
    stored = {s.order.order_id: s.order for s in await engine.runtime.store.campaign_orders(cid)}
    leaders = {team.seats[0].order_id for team in teams}
    for order_id, order in stored.items():
        unit = LEADER_PRICE if order_id in leaders else 990
        assert (order.qty, order.amount) == (1, unit), order
    return stored


async def test_last_seat_race_with_team_deal_options(any_engine: Engine) -> None:
    """Teams of 3, automatic success from 2 paid seats, the leader at 490, 1 unit per order:
    200 shoppers race for the last seat, exactly one is seated; the winner pays, the other
    member never does, and at expiry the team succeeds with the leader and the winner."""
    engine = any_engine
    await start(
        engine,
        "dealrace",
        team_size=3,
        stock=1_000,
        limit=1,
        per_order_limit=1,
        auto_success_min_paid=2,
        leader_price=LEADER_PRICE,
    )
    team = await paid_team(engine, "dealrace", "leader")
    second = await join(engine, team.team_id, "second")
    results = await asyncio.gather(
        *(engine.teams.join(team.team_id, f"u{n}", f"k{n}") for n in range(200)),
        return_exceptions=True,
    )
    assert outcomes(results) == {"TeamSeatResult": 1, "TeamFull": 199}, outcomes(results)
    (winner,) = [r for r in results if isinstance(r, TeamSeatResult)]
    await pay(engine, winner.order)
    full = await engine.teams.get(team.team_id)
    assert (full.held, full.paid, full.remaining) == (1, 2, 0)

    await age_team(engine, team.team_id, TTL_MS + 1_000)
    reaped = await asyncio.gather(*(engine.reaper.expire_campaign("dealrace") for _ in range(2)))
    assert sum(n for n, _ in reaped) == 1
    done = await engine.teams.get(team.team_id)
    assert (done.state, done.why, done.paid, done.held) == (TeamState.SUCCEEDED, "auto", 2, 0)
    assert [s.user_id for s in done.seats] == ["leader", winner.order.user_id]
    assert (await engine.orders.get(second.order_id)).state is OrderState.EXPIRED
    assert await stock(engine, "dealrace") == (1_000, 998, 0, 2)
    stored = await _amounts_in_sql(engine, "dealrace", [done])
    assert sorted(o.amount for o in stored.values() if o.state is OrderState.PAID) == [490, 990]
    await assert_invariants(engine, "dealrace")


async def test_quick_join_2000_shoppers_with_team_deal_options(any_engine: Engine) -> None:
    """2,000 quick-joiners with automatic success on (2 paid seats of 3) and a leader price:
    no team ever holds more than its seats; a member in four never pays, so at expiry some
    teams succeed automatically, others fail; every amount is right in SQL and GMV is the
    paid amounts."""
    engine, cid = any_engine, "dealquick"
    await start(
        engine,
        cid,
        team_size=3,
        stock=3_000,
        limit=1,
        per_order_limit=1,
        auto_success_min_paid=2,
        leader_price=LEADER_PRICE,
    )
    users = [f"shopper-{n}" for n in range(2_000)]
    walks_off = set(users[500::4])
    first = await _deal_round(engine, cid, users[:500], walks_off)
    assert all(r.opened for r in first)
    second = await _deal_round(engine, cid, users[500:], walks_off)
    assert len([r for r in second if not r.opened]) == 1_000

    teams = await all_teams(engine, cid)
    for team in teams:
        assert team.held + team.paid <= team.size and len(team.seats) <= team.size
    paid_at_expiry = {t.team_id: t.paid for t in teams if t.state is TeamState.OPEN}
    for team_id in paid_at_expiry:  # one by one: each reads the whole joinable index
        await age_team(engine, team_id, TTL_MS + 1_000)
    reaped = await asyncio.gather(*(engine.reaper.expire_campaign(cid) for _ in range(2)))
    assert sum(n for n, _ in reaped) == len(paid_at_expiry)

    teams = await all_teams(engine, cid)
    orders = await all_orders(engine, cid)
    by_kind = Counter(_deal_end(team, orders, paid_at_expiry) for team in teams)
    assert by_kind["auto"] > 100 and by_kind["filled"] > 100 and by_kind["failed"] >= 500
    seated = Counter(
        seat.user_id
        for team in teams
        for seat in team.seats
        if orders[seat.order_id].state is not OrderState.EXPIRED
    )
    assert max(seated.values()) == 1, "a shopper holds two seats"
    assert not any(o.state is OrderState.HELD for o in orders.values())

    stored = await _amounts_in_sql(engine, cid, teams)
    assert len(stored) == 2_000
    paid = [o for o in stored.values() if o.state is OrderState.PAID]
    view = await engine.campaigns.get(cid)
    stats = await campaign_stats(engine.runtime, view)
    assert stats.items[0].gmv == sum(o.amount for o in paid)
    assert stats.items[0].paid_units == len(paid) == view.stock[0].paid
    assert stats.teams is not None
    assert (stats.teams.auto_succeeded, stats.teams.filled) == (by_kind["auto"], by_kind["filled"])
    assert stats.teams.auto_unfilled_seats == by_kind["auto"]
    await assert_invariants(engine, cid)


def _deal_end(team: Team, orders: dict[str, Order], paid_at_expiry: dict[str, int]) -> str:
    """How the team ended (auto, filled, failed), checked against its seats: never more than
    its size, no held seat left, each seat's order in the state its end leaves it."""
    members = [seat.user_id for seat in team.seats]
    assert len(members) == len(set(members)) <= team.size and team.held == 0, team
    states = {orders[seat.order_id].state for seat in team.seats}
    if team.auto_succeeded:
        assert paid_at_expiry[team.team_id] == team.paid == 2 == len(members), team
        assert states == {OrderState.PAID}, team
        return "auto"
    if team.state is TeamState.SUCCEEDED:
        assert team.paid == 3 == len(members) and states == {OrderState.PAID}, team
        return "filled"
    assert (team.state, paid_at_expiry[team.team_id]) == (TeamState.FAILED, 1), team
    assert states <= {OrderState.REFUNDED, OrderState.EXPIRED}, team
    return "failed"


async def _shopper_worker(engine: Engine, queue: list[str], paid: list[Order]) -> None:
    """Serve shoppers until none is left: quick-join, then pay at once (a leader's payment
    opens the team for the quick-joiners still to come)."""
    while queue:
        user = queue.pop()
        seat = await engine.teams.quick_join("free", user, SKU, "k")
        paid.append(await pay(engine, seat.order))


async def test_quick_join_and_pay_interleaved_never_overfill(engine: Engine) -> None:
    await start(engine, "free", team_size=3, stock=2_000, limit=1)
    users = [f"s{n}" for n in range(1_500)]
    queue, paid = list(users), list[Order]()
    # 64 shoppers in flight at any time: quick_joins race each other and the payments.
    await asyncio.gather(*(_shopper_worker(engine, queue, paid) for _ in range(64)))
    assert len(paid) == 1_500
    assert {order.state for order in paid} == {OrderState.PAID}

    teams = await all_teams(engine, "free")
    seated = Counter[str]()
    for team in teams:
        members = [seat.user_id for seat in team.seats]
        assert len(members) == len(set(members)) == team.paid <= team.size
        assert team.held == 0
        assert team.state is (TeamState.SUCCEEDED if team.paid == 3 else TeamState.OPEN)
        seated.update(members)
    assert seated == Counter(dict.fromkeys(users, 1))
    succeeded = sum(1 for team in teams if team.state is TeamState.SUCCEEDED)
    assert succeeded >= 400, f"only {succeeded} teams filled: quick_join does not match"
    assert 3 * succeeded + sum(t.paid for t in teams if t.state is TeamState.OPEN) == 1_500
    await assert_invariants(engine, "free")


# --------------------------------------------------------------------------- invalidation


class Load:
    """What the shoppers of the invalidation test saw; ``started`` once enough was paid."""

    def __init__(self, cid: str, teams: Sequence[Team], start_after: int) -> None:
        self.cid = cid
        self.teams = list(teams)
        self.start_after = start_after
        self.started = asyncio.Event()
        self.paid: list[Order] = []
        self.rejected = Counter[str]()
        self.stopped_by = Counter[str]()


async def _seat(engine: Engine, load: Load, user: str, rng: random.Random) -> Order | None:
    """A quick-join, or a join of one of the teams open before the load; None if refused."""
    if rng.random() < 0.5:
        return (await engine.teams.quick_join(load.cid, user, SKU, "k")).order
    try:
        return await join(engine, rng.choice(load.teams).team_id, user)
    except (TeamFull, TeamClosed) as exc:
        load.rejected[exc.code] += 1
        return None


async def _shopper_until_invalidated(engine: Engine, load: Load, worker: int) -> None:
    """Seat and pay shopper after shopper until the campaign refuses with Invalidated."""
    rng = random.Random(worker)
    for n in range(300):
        try:
            order = await _seat(engine, load, f"w{worker}-{n}", rng)
            if order is not None:
                load.paid.append(await pay(engine, order))
        except Invalidated:
            load.stopped_by["invalidated"] += 1
            return
        except InvalidState as exc:  # the cascade cancelled the seat before its payment
            load.rejected[exc.code] += 1
        if len(load.paid) >= load.start_after:
            load.started.set()
    load.stopped_by["ran_out"] += 1


async def _invalidate_mid_load(engine: Engine, load: Load, unpaid: Sequence[Order]) -> None:
    """Once the load is under way: invalidate while the older unpaid seats try to pay."""
    await load.started.wait()

    async def pay_or_reject(order: Order) -> None:
        try:
            load.paid.append(await pay(engine, order))
        except (Invalidated, InvalidState) as exc:
            load.rejected[exc.code] += 1

    await asyncio.gather(
        *(pay_or_reject(order) for order in unpaid[::2]),
        engine.campaigns.invalidate(load.cid),
        *(pay_or_reject(order) for order in unpaid[1::2]),
    )


async def _setup_invalidation(
    engine: Engine, cid: str
) -> tuple[list[Team], list[Team], list[Order]]:
    """20 succeeded teams, 40 open ones (20 with a held seat), 25 pending ones."""
    await start(engine, cid, team_size=3, stock=5_000, limit=1)
    succeeded = await asyncio.gather(*(paid_team(engine, cid, f"s-lead-{n}") for n in range(20)))
    for n, team in enumerate(succeeded):
        for m in range(2):
            await pay(engine, await join(engine, team.team_id, f"s-{n}-{m}"))
    open_teams = await asyncio.gather(*(paid_team(engine, cid, f"o-lead-{n}") for n in range(40)))
    unpaid = [await join(engine, team.team_id, f"h-{n}") for n, team in enumerate(open_teams[:20])]
    unpaid += [(await engine.teams.open(cid, f"p-lead-{n}", SKU, 1, "k")).order for n in range(25)]
    return list(succeeded), list(open_teams), unpaid


async def test_invalidation_under_load_fails_open_teams_and_keeps_succeeded(
    engine: Engine,
) -> None:
    cid = "inv"
    succeeded, open_teams, unpaid = await _setup_invalidation(engine, cid)
    await assert_invariants(engine, cid)

    idle = unpaid[-5:]  # five pending leaders who never pay: invalidation dissolves them
    load = Load(cid, open_teams, start_after=100)
    await asyncio.gather(
        *(_shopper_until_invalidated(engine, load, worker) for worker in range(32)),
        _invalidate_mid_load(engine, load, unpaid[:-5]),
    )
    assert load.stopped_by == {"invalidated": 32}, "the load must run into the invalidation"
    assert len(load.paid) >= 100
    await engine.reaper.expire_campaign(cid)  # idempotent: the cascade already ran

    teams = {team.team_id: team for team in await all_teams(engine, cid)}
    orders = await all_orders(engine, cid)
    for team in succeeded:
        assert (teams[team.team_id].state, teams[team.team_id].paid) == (TeamState.SUCCEEDED, 3)
    for team in open_teams:
        assert teams[team.team_id].state in (TeamState.SUCCEEDED, TeamState.FAILED)
    refunds = Counter(
        e["order"] for e in await events(engine, cid) if e["type"] == "order.refunded"
    )
    assert set(refunds.values()) == {1}, "a paid seat was refunded twice"
    by_state = Counter[TeamState]()
    for team in teams.values():
        by_state[team.state] += 1
        states = Counter(orders[seat.order_id].state for seat in team.seats)
        if team.state is TeamState.SUCCEEDED:
            assert states == {OrderState.PAID: 3}, team
        elif team.state is TeamState.FAILED:
            assert team.why == "invalidated", team
            assert set(states) <= {OrderState.REFUNDED, OrderState.CANCELLED}, team
            assert states[OrderState.REFUNDED] == team.paid
        else:
            assert (team.state, team.why, team.paid) == (TeamState.DISSOLVED, "invalidated", 0)
    assert by_state[TeamState.FAILED] > 0, by_state
    for order in idle:
        assert orders[order.order_id].state is OrderState.CANCELLED
        assert teams[cast(str, order.team_id)].state is TeamState.DISSOLVED
    assert set(by_state) <= {TeamState.SUCCEEDED, TeamState.FAILED, TeamState.DISSOLVED}
    refunded = {oid for oid, order in orders.items() if order.state is OrderState.REFUNDED}
    assert refunded == set(refunds)

    # Every payment the load saw accepted stands, or was refunded because its team failed.
    for order in load.paid:
        final = orders[order.order_id]
        team_state = teams[cast(str, final.team_id)].state
        assert final.state is (
            OrderState.PAID if team_state is TeamState.SUCCEEDED else OrderState.REFUNDED
        )
    assert not any(order.state is OrderState.HELD for order in orders.values())
    initial, available, held, paid_units = await stock(engine, cid)
    paid_teams = by_state[TeamState.SUCCEEDED]
    assert (held, paid_units, available) == (0, 3 * paid_teams, initial - 3 * paid_teams)
    await assert_invariants(engine, cid)
