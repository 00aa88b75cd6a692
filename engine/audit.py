"""The invariant audit of one campaign's Redis state (SPEC section 6, items 1 and 2).

Reads everything the scripts maintain and recomputes it from the orders:
- per item: available + held + paid + gone == initial stock, and available >= 0;
- per item: the held, paid and gone buckets equal the sums over the orders in those states;
- per user: the units counter equals held + paid units over their orders, within the limit;
- the deadline index holds exactly the held orders.
Used by the tests, ``flashteam demo`` and the load-test verdict. Reads are not atomic with
traffic: audit a quiet campaign (after the sale, or between test steps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.keys import keys_of
from engine.models import Order, OrderState
from engine.runtime import Runtime
from engine.scripts import guarded


@dataclass(slots=True)
class Audit:
    """What the audit found; ``ok`` when ``violations`` is empty."""

    campaign_id: str
    orders: dict[OrderState, int] = field(default_factory=dict)
    units: dict[OrderState, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def audit_campaign(rt: Runtime, campaign_id: str) -> Audit:
    """Check the stock, per-user and index invariants of one campaign."""
    keys = keys_of(campaign_id)
    redis = rt.redis
    meta: dict[str, str] = await guarded(redis.hgetall(keys.meta))
    inv: dict[str, str] = await guarded(redis.hgetall(keys.inv))
    users: dict[str, str] = await guarded(redis.hgetall(keys.users))
    records: dict[str, str] = await guarded(redis.hgetall(keys.orders))
    indexed: list[str] = await guarded(redis.zrange(keys.deadlines, 0, -1))
    audit = Audit(campaign_id)
    if not meta:
        audit.violations.append(f"campaign {campaign_id} is not in Redis")
        return audit

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

    audit.violations += _stock_violations(inv, expected)
    audit.violations += _user_violations(users, per_user, int(meta["limit"]))
    held = {order.order_id for order in orders if order.state is OrderState.HELD}
    if held != set(indexed):
        audit.violations.append(
            f"deadline index differs from held orders: {len(set(indexed) ^ held)} ids"
        )
    return audit


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


def _user_violations(users: dict[str, str], per_user: Counter[str], limit: int) -> list[str]:
    found = []
    for user in set(per_user) | set(users):
        counted, actual = per_user[user], int(users.get(user, 0))
        if counted != actual:
            found.append(f"user {user}: counter {actual}, orders say {counted}")
        if counted > limit:
            found.append(f"user {user}: {counted} units over the limit {limit}")
    return found
