"""`flashteam reconcile <campaign>`: compare Redis with the durable store, record by record.

Every order and every team of the campaign is compared field by field: orders on user, sku,
qty, amount, state, version, team and payment reference; teams on leader, sku, size, state,
held and paid seats, version, members (the seats, leader first) and how the team ended
(``why``: a team that succeeded automatically at expiry says ``auto``). A record on one side
only is a difference too. After the flush worker has drained, the two sides must be equal;
each difference is reported by id with the field and both values.

Orders, units and amounts per (item, state), and teams per state, are printed as a summary;
the verdict is the record comparison (a swap of two orders' users leaves every total equal).

A sharded campaign's orders are read from every stock bucket (engine/shards.py), its outbox
from every bucket's stream.

Events still in the outbox stream mean SQL is behind: differences are then expected, and the
result is not ok either (the check is meant for a drained campaign).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from engine.keys import keys_of
from engine.models import AUTO_SUCCESS, Order, Team
from engine.runtime import Runtime
from engine.scripts import RedisClient, guarded
from engine.shards import outbox_entries

PAGE = 1000  # fields per HSCAN call

# One record as compared: small tuples of plain values, one per order or team, never the
# decoded objects (a campaign can hold 100,000+ orders on each side).
Record: TypeAlias = tuple[str | int | None, ...]

ORDER_FIELDS = ("user", "sku", "qty", "amount", "state", "version", "team", "payment_ref")
TEAM_FIELDS = ("leader", "sku", "size", "state", "held", "paid", "version", "members", "why")
_SKU, _QTY, _AMOUNT, _STATE = 1, 2, 3, 4  # positions in an order Record
_TEAM_STATE, _TEAM_WHY = 3, 8  # positions in a team Record


@dataclass(slots=True)
class Reconciliation:
    """The comparison of one campaign; ``ok`` when no record differs and nothing is left to
    flush."""

    campaign_id: str
    lines: list[str] = field(default_factory=list)  # the per-(sku, state) summary
    differences: list[str] = field(default_factory=list)  # one per field or missing record
    unflushed: int = 0  # events still in the outbox stream
    orders: int = 0  # order ids seen on either side
    teams: int = 0
    orders_differing: int = 0
    teams_differing: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences and not self.unflushed


async def reconcile(rt: Runtime, campaign_id: str) -> Reconciliation:
    """Compare one campaign's orders and teams in Redis with the SQL store."""
    keys = keys_of(campaign_id)
    shards = (await rt.layout(campaign_id)).shards
    redis = rt.redis
    result = Reconciliation(campaign_id)
    unflushed_before = await outbox_entries(redis, shards)
    redis_orders: dict[str, Record | str] = {}
    for shard in shards:
        orders = keys_of(shard).orders
        redis_orders |= await _redis_records(redis, orders, _order_from_redis, campaign_id)
    redis_teams = await _redis_records(redis, keys.teams, _team_from_redis, campaign_id)
    sql_orders = {
        s.order.order_id: _order(s.order) for s in await rt.store.campaign_orders(campaign_id)
    }
    sql_teams = {t.team_id: _team(t) for t in await rt.store.campaign_teams(campaign_id)}
    # Read again: an event written while the records were read is as unflushed as one before.
    result.unflushed = max(unflushed_before, await outbox_entries(redis, shards))

    _summarize(result, redis_orders, sql_orders, redis_teams, sql_teams)
    result.orders, result.orders_differing = _compare(
        result, "order", ORDER_FIELDS, redis_orders, sql_orders
    )
    result.teams, result.teams_differing = _compare(
        result, "team", TEAM_FIELDS, redis_teams, sql_teams
    )
    return result


# --------------------------------------------------------------------------- reading


def _order(order: Order) -> Record:
    return (
        order.user_id,
        order.sku,
        order.qty,
        order.amount,
        order.state.value,
        order.version,
        order.team_id,
        order.payment_ref,
    )


def _team(team: Team) -> Record:
    members = ",".join(f"{seat.order_id}={seat.user_id}" for seat in team.seats)
    return (
        team.leader_id,
        team.sku,
        team.size,
        team.state.value,
        team.held,
        team.paid,
        team.version,
        members,
        team.why,
    )


def _order_from_redis(order_id: str, record: str, campaign_id: str) -> Record:
    return _order(Order.from_record(order_id, record, campaign_id))


def _team_from_redis(team_id: str, record: str, campaign_id: str) -> Record:
    return _team(Team.from_record(team_id, record, campaign_id))


async def _pages(redis: RedisClient, key: str) -> AsyncIterator[dict[str, str]]:
    """The fields of a hash, ``PAGE`` at a time (HSCAN: no single reply holds them all)."""
    cursor = 0
    while True:
        cursor, page = await guarded(redis.hscan(key, cursor, count=PAGE))
        yield page
        if not int(cursor):
            return


async def _redis_records(
    redis: RedisClient,
    key: str,
    decode: Callable[[str, str, str], Record],
    campaign_id: str,
) -> dict[str, Record | str]:
    """Each record of the hash as a Record, or as the reason it cannot be decoded (HSCAN may
    return a field twice while the hash changes: the last one read stays)."""
    records: dict[str, Record | str] = {}
    async for page in _pages(redis, key):
        for record_id, record in page.items():
            try:
                records[record_id] = decode(record_id, record, campaign_id)
            except (ValueError, KeyError, TypeError) as exc:
                records[record_id] = f"undecodable record {record!r} ({exc!r})"
    return records


# --------------------------------------------------------------------------- comparing


def _compare(
    result: Reconciliation,
    kind: str,
    fields: Sequence[str],
    in_redis: dict[str, Record | str],
    in_sql: dict[str, Record],
) -> tuple[int, int]:
    """Append every difference between the two sides; (ids seen, ids that differ)."""
    ids = sorted(in_redis.keys() | in_sql.keys(), key=lambda i: (len(i), i))
    differing = 0
    for record_id in ids:
        found = _differences(
            f"{kind} {record_id}", fields, in_redis.get(record_id), in_sql.get(record_id)
        )
        if found:
            differing += 1
            result.differences += found
    return len(ids), differing


def _differences(
    label: str, fields: Sequence[str], redis: Record | str | None, sql: Record | None
) -> list[str]:
    if isinstance(redis, str):
        return [f"{label}: redis holds an {redis}"]
    if redis is None or sql is None:
        side, other, record = ("redis", "sql", sql) if redis is None else ("sql", "redis", redis)
        assert record is not None
        return [f"{label}: missing in {side} ({other}: {_describe(fields, record)})"]
    return [
        f"{label} {name}: redis {_show(a)} sql {_show(b)}"
        for name, a, b in zip(fields, redis, sql, strict=True)
        if a != b
    ]


def _show(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _describe(fields: Sequence[str], record: Record) -> str:
    return ", ".join(f"{name} {_show(value)}" for name, value in zip(fields, record, strict=True))


# --------------------------------------------------------------------------- the summary


def _summarize(
    result: Reconciliation,
    redis_orders: dict[str, Record | str],
    sql_orders: dict[str, Record],
    redis_teams: dict[str, Record | str],
    sql_teams: dict[str, Record],
) -> None:
    """Orders, units and amounts per (sku, state), and teams per state, on both sides."""
    in_redis, in_sql = _totals(redis_orders.values()), _totals(sql_orders.values())
    for sku, state, measure in sorted(in_redis.keys() | in_sql.keys()):
        key = (sku, state, measure)
        _line(result, f"{sku:<16} {state:<10} {measure:<7}", in_redis[key], in_sql[key])
    teams_redis = Counter(_team_state(r) for r in redis_teams.values() if isinstance(r, tuple))
    teams_sql = Counter(_team_state(r) for r in sql_teams.values())
    for state in sorted(teams_redis.keys() | teams_sql.keys()):
        label = f"{'teams':<16} {state:<10} {'count':<7}"
        _line(result, label, teams_redis[state], teams_sql[state])


def _team_state(record: Record) -> str:
    """A team's state for the summary; ``succeeded+auto`` for one that succeeded
    automatically at expiry."""
    state = str(record[_TEAM_STATE])
    return f"{state}+auto" if record[_TEAM_WHY] == AUTO_SUCCESS else state


def _totals(records: Iterable[Record | str]) -> Counter[tuple[str, str, str]]:
    totals: Counter[tuple[str, str, str]] = Counter()
    for record in records:
        if isinstance(record, str):
            continue  # undecodable: reported as a difference of its own
        sku, state = str(record[_SKU]), str(record[_STATE])
        totals[(sku, state, "orders")] += 1
        totals[(sku, state, "units")] += _int(record[_QTY])
        totals[(sku, state, "amount")] += _int(record[_AMOUNT])
    return totals


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _line(result: Reconciliation, label: str, redis_value: int, sql_value: int) -> None:
    line = f"{label} redis {redis_value:>12} sql {sql_value:>12}"
    result.lines.append(line + ("" if redis_value == sql_value else "   <- differs"))
