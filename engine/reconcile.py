"""`flashteam reconcile <campaign>`: compare Redis with the durable store.

Counts orders, units and amounts per (item, state), and teams per state, on both sides. After
the flush worker has drained, the two must be equal; any difference is printed and makes the
command exit non-zero.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.keys import keys_of
from engine.models import Order, Team
from engine.runtime import Runtime
from engine.scripts import guarded


@dataclass(slots=True)
class Reconciliation:
    """The comparison of one campaign; ``ok`` when nothing differs."""

    campaign_id: str
    lines: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    unflushed: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences


async def reconcile(rt: Runtime, campaign_id: str) -> Reconciliation:
    """Compare one campaign's orders and teams in Redis with the SQL store."""
    keys = keys_of(campaign_id)
    redis = rt.redis
    result = Reconciliation(campaign_id)
    result.unflushed = int(await guarded(redis.xlen(keys.events)))
    records: dict[str, str] = await guarded(redis.hgetall(keys.orders))
    team_records: dict[str, str] = await guarded(redis.hgetall(keys.teams))

    in_redis: Counter[tuple[str, str, str]] = Counter()
    for order in (Order.from_record(i, r) for i, r in records.items()):
        for measure, value in (("orders", 1), ("units", order.qty), ("amount", order.amount)):
            in_redis[(order.sku, order.state.value, measure)] += value
    in_sql: Counter[tuple[str, str, str]] = Counter()
    for totals in await rt.store.order_totals(campaign_id):
        for measure in ("orders", "units", "amount"):
            in_sql[(totals.sku, totals.state, measure)] += getattr(totals, measure)

    for sku, state, measure in sorted(set(in_redis) | set(in_sql)):
        key = (sku, state, measure)
        _compare(result, f"{sku:<16} {state:<10} {measure:<7}", in_redis[key], in_sql[key])

    teams_redis = Counter(Team.from_record(i, r).state.value for i, r in team_records.items())
    teams_sql = Counter(await rt.store.team_totals(campaign_id))
    for state in sorted(set(teams_redis) | set(teams_sql)):
        _compare(
            result, f"{'teams':<16} {state:<10} {'count':<7}", teams_redis[state], teams_sql[state]
        )
    return result


def _compare(result: Reconciliation, label: str, redis_value: int, sql_value: int) -> None:
    line = f"{label} redis {redis_value:>12} sql {sql_value:>12}"
    result.lines.append(line + ("" if redis_value == sql_value else "   <- differs"))
    if redis_value != sql_value:
        result.differences.append(line)
