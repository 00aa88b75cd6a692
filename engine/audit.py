"""The invariant audit of one campaign's Redis state: invariants I1 to I3, docs/invariants.md.

Reads everything the scripts maintain and recomputes it from the orders:
- per item: available + held + paid + gone == initial stock, and available >= 0;
- per item: the held and paid buckets equal the sums over the orders in those states;
- per order: its amount is qty x the item's price (a team leader's order: its leader price,
  when the item has one);
- per user: the units counter equals held + paid units over their orders, within the limit;
- the deadline index holds exactly the held orders;
- per team: held + paid seats <= team_size, one seat per user, the seat counters match the
  seats' orders, a succeeded team has exactly team_size paid seats (one that succeeded
  automatically at expiry: from the campaign's auto_success_min_paid to team_size - 1, and
  only paid seats), every held or paid team order sits in its team, and the joinable and
  expiry indexes hold exactly the open teams.
A sharded campaign (engine/shards.py) is audited bucket by bucket as above (each bucket's
buckets add up to its share of the stock), and across buckets: per item, the shares of every
bucket plus the units of transfers not yet credited equal the initial stock, and every order
sits in its shopper's bucket.

Used by the tests, ``flashteam demo`` and the load-test verdict. Reads are not atomic with
traffic: audit a quiet campaign (after the sale, or between test steps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.keys import keys_of
from engine.models import Order, OrderState, Team, TeamState, to_ms
from engine.runtime import Runtime
from engine.scripts import guarded
from engine.shards import Layout, in_transit


@dataclass(slots=True)
class Audit:
    """What the audit found; ``ok`` when ``violations`` is empty."""

    campaign_id: str
    orders: dict[OrderState, int] = field(default_factory=dict)
    units: dict[OrderState, int] = field(default_factory=dict)
    teams: dict[TeamState, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def audit_campaign(rt: Runtime, campaign_id: str) -> Audit:
    """Check the stock, per-user and index invariants of one campaign."""
    keys = keys_of(campaign_id)
    redis = rt.redis
    layout = await rt.layout(campaign_id)
    audit = Audit(campaign_id)
    if not await guarded(redis.exists(keys.meta)):
        audit.violations.append(f"campaign {campaign_id} is not in Redis")
        return audit
    team_records: dict[str, str] = await guarded(redis.hgetall(keys.teams))
    teams = [Team.from_record(team_id, raw) for team_id, raw in team_records.items()]
    leaders = {team.seats[0].order_id for team in teams if team.seats}
    orders: list[Order] = []
    shares: Counter[str] = Counter()  # per sku, the buckets' shares of the stock
    for shard in layout.shards:
        orders += await _audit_bucket(rt, shard, layout, audit, shares, leaders)
    if layout.sharded:
        audit.violations += await _conservation(rt, layout, shares)
    joinable: list[str] = await guarded(redis.zrange(keys.team_index, 0, -1))
    team_deadlines: list[str] = await guarded(redis.zrange(keys.team_expiry, 0, -1))
    auto_min = int(await guarded(redis.hget(keys.meta, "auto")) or 0)
    for team in teams:
        audit.teams[team.state] = audit.teams.get(team.state, 0) + 1
    by_id = {order.order_id: order for order in orders}
    audit.violations += _team_violations(teams, by_id, set(joinable), set(team_deadlines), auto_min)
    return audit


async def _audit_bucket(
    rt: Runtime,
    shard: str,
    layout: Layout,
    audit: Audit,
    shares: Counter[str],
    leaders: set[str],
) -> list[Order]:
    """Audit one stock bucket (the whole campaign when it has one): its stock buckets, users'
    units, deadline index and amounts against its orders (``leaders``: the orders of team
    leaders); returns the orders, adds its shares."""
    keys = keys_of(shard)
    redis = rt.redis
    meta: dict[str, str] = await guarded(redis.hgetall(keys.meta))
    inv: dict[str, str] = await guarded(redis.hgetall(keys.inv))
    users: dict[str, str] = await guarded(redis.hgetall(keys.users))
    records: dict[str, str] = await guarded(redis.hgetall(keys.orders))
    indexed: list[str] = await guarded(redis.zrange(keys.deadlines, 0, -1))
    where = "" if shard == layout.campaign_id or not layout.sharded else f"bucket {shard}: "
    if not meta:
        audit.violations.append(f"{where}not in Redis")
        return []
    orders = [Order.from_record(order_id, raw) for order_id, raw in records.items()]
    bucket_of = {OrderState.HELD: "h", OrderState.PAID: "p"}
    expected: Counter[str] = Counter()
    per_user: Counter[str] = Counter()
    for order in orders:
        audit.orders[order.state] = audit.orders.get(order.state, 0) + 1
        audit.units[order.state] = audit.units.get(order.state, 0) + order.qty
        if order.state in bucket_of:
            expected[f"{bucket_of[order.state]}:{order.sku}"] += order.qty
            per_user[order.user_id] += order.qty
        if layout.shard_of_user(order.user_id) != shard:
            audit.violations.append(f"order {order.order_id}: its user's bucket is another")
    found = _stock_violations(inv, expected) + _user_violations(users, per_user, int(meta["limit"]))
    found += _amount_violations(orders, inv, leaders)
    held = {order.order_id for order in orders if order.state is OrderState.HELD}
    if held != set(indexed):
        found.append(f"deadline index differs from held orders: {len(set(indexed) ^ held)} ids")
    audit.violations += [where + line for line in found]
    for name, value in inv.items():
        if name.startswith("i:"):
            shares[name[2:]] += int(value)
    return orders


async def _conservation(rt: Runtime, layout: Layout, shares: Counter[str]) -> list[str]:
    """Per item of a sharded campaign: the buckets' shares plus the units in transit equal
    the initial stock of its definition."""
    campaign = await rt.store.get_campaign(layout.campaign_id)
    if campaign is None:
        return []
    transit = await in_transit(rt, layout)
    found = []
    for item in campaign.items:
        share, moving = shares[item.sku], transit.get(item.sku, 0)
        if share + moving != item.stock:
            found.append(
                f"{item.sku}: the buckets' shares {share} + in transit {moving} != stock "
                f"{item.stock}"
            )
    return found


def _stock_violations(inv: dict[str, str], expected: Counter[str]) -> list[str]:
    found = []
    for sku in (name[2:] for name in inv if name.startswith("i:")):
        a, h, p, r, i = (int(inv.get(f"{b}:{sku}", 0)) for b in "ahpri")
        if a + h + p + r != i:
            found.append(f"{sku}: available {a} + held {h} + paid {p} + gone {r} != initial {i}")
        if a < 0:
            found.append(f"{sku}: available is {a}, below zero (oversold)")
        for bucket, actual in (("h", h), ("p", p)):
            if expected[f"{bucket}:{sku}"] != actual:
                found.append(
                    f"{sku}: bucket {bucket} is {actual}, orders say {expected[f'{bucket}:{sku}']}"
                )
    return found


def _amount_violations(orders: list[Order], inv: dict[str, str], leaders: set[str]) -> list[str]:
    """Each order's amount against its item's unit price (``$:``), or for a team leader's
    order the item's leader price (``l:``) when it has one."""
    found = []
    for order in orders:
        price = inv.get(f"$:{order.sku}")
        if order.order_id in leaders:
            price = inv.get(f"l:{order.sku}", price)
        if price is not None and order.amount != order.qty * int(price):
            found.append(
                f"order {order.order_id}: amount {order.amount}, {order.qty} x {price} expected"
            )
    return found


def _user_violations(users: dict[str, str], per_user: Counter[str], limit: int) -> list[str]:
    found = []
    for user in set(per_user) | set(users):
        counted, actual = per_user[user], int(users.get(user, 0))
        if counted != actual:
            found.append(f"user {user}: counter {actual}, orders say {counted}")
        if counted > limit:
            found.append(f"user {user}: {counted} units over the limit {limit}")
    return found


def _team_violations(
    teams: list[Team],
    orders: dict[str, Order],
    joinable: set[str],
    expiring: set[str],
    auto_min: int,
) -> list[str]:
    found = []
    seated: set[str] = set()
    should_index: set[str] = set()
    for team in teams:
        found += _one_team_violations(team, orders, auto_min)
        seated.update(seat.order_id for seat in team.seats)
        if team.state is TeamState.OPEN:
            if team.remaining > 0 and team.expires_at is not None:
                expires = to_ms(team.expires_at)
                should_index.add(f"{team.sku}|{team.remaining:03d}|{expires:013d}|{team.team_id}")
            if team.team_id not in expiring:
                found.append(f"team {team.team_id}: open but not in the expiry index")
        elif team.team_id in expiring:
            found.append(f"team {team.team_id}: {team.state} but in the expiry index")
    if joinable != should_index:
        found.append(
            f"joinable index differs from open teams with seats: {joinable ^ should_index}"
        )
    for order in orders.values():
        active = order.state in (OrderState.HELD, OrderState.PAID)
        if order.team_id and active and order.order_id not in seated:
            found.append(f"order {order.order_id}: {order.state} but not seated in its team")
    return found


def _one_team_violations(team: Team, orders: dict[str, Order], auto_min: int) -> list[str]:
    found = []
    name = f"team {team.team_id}"
    if team.held + team.paid > team.size:
        found.append(f"{name}: held {team.held} + paid {team.paid} > size {team.size}")
    users = [seat.user_id for seat in team.seats]
    if len(set(users)) != len(users):
        found.append(f"{name}: a user holds two seats")
    states = Counter(
        orders[seat.order_id].state if seat.order_id in orders else None for seat in team.seats
    )
    if None in states:
        found.append(f"{name}: a seat's order is missing")
    if team.state in (TeamState.PENDING, TeamState.OPEN) and (
        states[OrderState.HELD] != team.held or states[OrderState.PAID] != team.paid
    ):
        found.append(f"{name}: counters held {team.held} paid {team.paid}, seats say {states}")
    # A succeeded team's seats stay paid, or were refunded after sale; one that succeeded
    # automatically kept only its paid seats, at least the campaign's auto_success_min_paid.
    paid_then = states[OrderState.PAID] + states[OrderState.REFUNDED]
    if team.auto_succeeded:
        enough = 0 < auto_min <= team.paid < team.size
        if not (enough and team.held == 0 and team.paid == paid_then == len(team.seats)):
            found.append(
                f"{name}: succeeded automatically with held {team.held}, paid {team.paid}, "
                f"seats {states} (at least {auto_min} paid needed)"
            )
    elif team.state is TeamState.SUCCEEDED and not (
        team.held == 0 and team.paid == paid_then == team.size
    ):
        found.append(f"{name}: succeeded with held {team.held}, paid {team.paid}, seats {states}")
    if team.state is TeamState.FAILED and states[OrderState.HELD] + states[OrderState.PAID]:
        found.append(f"{name}: failed but seats are still held or paid: {states}")
    return found
