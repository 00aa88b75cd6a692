"""Request coalescing changes nothing a caller can see: the same requests, sent as one
coalesced batch or one script call each, give every request the same outcome and leave the
same state behind (per-user limits, idempotency, stock, teams)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, Rejected
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import Order, Team
from testkit.factories import flash_campaign, make_settings, team_campaign
from testkit.helpers import assert_invariants

USERS = ("u1", "u2", "u3", "u4")
KEYS = ("k1", "k2", "k3")
_ids = itertools.count()
# Each example makes its own campaigns, so reusing the engine fixture across examples is fine.
FIXTURE_REUSE = HealthCheck.function_scoped_fixture

Outcome = tuple[Any, ...]


def _order_shape(order: Order) -> tuple[Any, ...]:
    """An order without what differs between two campaigns: ids' prefix, times."""
    team = order.team_id.split(".")[1] if order.team_id else None
    return (
        order.order_id.split(".")[1],
        order.user_id,
        order.sku,
        order.qty,
        order.amount,
        order.state,
        order.kind,
        team,
        order.version,
    )


def _team_shape(team: Team) -> tuple[Any, ...]:
    seats = tuple((s.order_id.split(".")[1], s.user_id) for s in team.seats)
    return (
        team.team_id.split(".")[1],
        team.leader_id,
        team.qty,
        team.state,
        team.held,
        team.paid,
        seats,
    )


async def _outcome(call: Awaitable[Any]) -> Outcome:
    try:
        result = await call
    except Rejected as exc:
        details = {k: v for k, v in exc.details.items() if k not in ("starts_at", "ends_at")}
        return ("rejected", type(exc).__name__, sorted(details.items()))
    order = result.order
    return ("ok", _order_shape(order), result.replayed, getattr(result, "opened", None))


async def _state(engine: Engine, campaign_id: str) -> tuple[Any, ...]:
    keys = keys_of(campaign_id)
    redis = engine.runtime.redis
    orders: Any = await redis.hgetall(keys.orders)
    teams: Any = await redis.hgetall(keys.teams)
    inv: Any = await redis.hgetall(keys.inv)
    users: Any = await redis.hgetall(keys.users)
    idem: Any = await redis.hgetall(keys.idem)  # "<user>:<key>" -> "<op><order seq>"
    return (
        sorted(_order_shape(Order.from_record(i, r)) for i, r in orders.items()),
        sorted(_team_shape(Team.from_record(i, r)) for i, r in teams.items()),
        sorted((k, v) for k, v in inv.items() if not k.startswith("out:")),
        sorted(users.items()),
        sorted(idem.items()),
    )


async def _both_ways(engine: Engine, calls: Sequence[Any]) -> tuple[list[Outcome], list[Outcome]]:
    """``calls`` are functions of a campaign id giving one engine call: run them all at once
    on campaign A (coalesced), and one at a time on campaign B."""
    batches = Counter[str]()
    engine.runtime.scripts.observe = lambda name, _: batches.update((name,))
    together = await asyncio.gather(*(_outcome(call("A")) for call in calls))
    assert batches["batch"] == 1, f"not one coalesced call: {batches}"
    apart = [await _outcome(call("B")) for call in calls]
    engine.runtime.scripts.observe = None
    return together, apart


flash_requests = st.lists(
    st.tuples(
        st.sampled_from(USERS),
        st.sampled_from(("sku-1", "sku-2", "nope")),
        st.integers(1, 3),
        st.sampled_from(KEYS),
    ),
    min_size=2,
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=flash_requests)
async def test_coalesced_reserves_equal_one_by_one(
    engine: Engine, requests: list[tuple[str, str, int, str]]
) -> None:
    n = next(_ids)
    a, b = f"a{n}", f"b{n}"
    now = await engine.runtime.now()
    for cid in (a, b):
        await engine.campaigns.create(
            flash_campaign(now, cid, stock=6, limit=4, skus=("sku-1", "sku-2"))
        )
    names = {"A": a, "B": b}
    calls = [
        lambda c, u=u, s=s, q=q, k=k: engine.flash.reserve(names[c], u, s, q, k)
        for u, s, q, k in requests
    ]
    together, apart = await _both_ways(engine, calls)
    assert together == apart
    assert await _state(engine, a) == await _state(engine, b)
    await assert_invariants(engine, a)


team_requests = st.lists(
    st.tuples(
        st.sampled_from(("join", "quick")),
        st.sampled_from((*USERS, "lead0", "lead1")),
        st.integers(0, 2),  # which team a join targets (2: an unknown one)
        st.sampled_from(KEYS),
    ),
    min_size=2,
    max_size=30,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=team_requests)
async def test_coalesced_joins_equal_one_by_one(
    engine: Engine, requests: list[tuple[str, str, int, str]]
) -> None:
    n = next(_ids)
    names = {"A": f"ta{n}", "B": f"tb{n}"}
    now = await engine.runtime.now()
    team_ids: dict[str, list[str]] = {}
    for label, cid in names.items():
        await engine.campaigns.create(team_campaign(now, cid, stock=9, limit=2, team_size=3))
        team_ids[label] = []
        for leader in ("lead0", "lead1"):  # two open teams, the same on both sides
            opened = await engine.teams.open(cid, leader, "sku-1", 1, "open")
            await engine.orders.pay(opened.order.order_id, leader, f"pay-{leader}")
            team_ids[label].append(opened.team.team_id)
        team_ids[label].append(f"{cid}.t99")

    def call(op: str, user: str, which: int, key: str) -> Any:
        if op == "join":
            return lambda c: engine.teams.join(team_ids[c][which], user, key)
        return lambda c: engine.teams.quick_join(names[c], user, "sku-1", key)

    together, apart = await _both_ways(engine, [call(*r) for r in requests])
    assert together == apart
    assert await _state(engine, names["A"]) == await _state(engine, names["B"])
    await assert_invariants(engine, names["A"])


async def test_off_means_one_script_call_per_request(
    redis: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings_off = make_settings(redis_server.url, tmp_path, coalesce=False)
    async with await Engine.open(settings_off) as engine:
        await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=50))
        calls = Counter[str]()
        engine.runtime.scripts.observe = lambda name, _: calls.update((name,))
        await asyncio.gather(
            *(engine.flash.reserve("sale", f"u{i}", "sku-1", 1, "k") for i in range(40))
        )
        assert calls == {"reserve_stock": 40}


@pytest.mark.parametrize("batch", [1, 7, 128])
async def test_hot_item_with_any_batch_size_sells_exactly_its_stock(
    redis: Any, redis_server: RedisServer, tmp_path: Path, batch: int
) -> None:
    config = make_settings(redis_server.url, tmp_path, coalesce_batch=batch)
    async with await Engine.open(config) as engine:
        await engine.campaigns.create(
            flash_campaign(await engine.runtime.now(), stock=100, limit=1)
        )
        calls = Counter[str]()
        engine.runtime.scripts.observe = lambda name, _: calls.update((name,))
        results = await asyncio.gather(
            *(
                _outcome(engine.flash.reserve("sale", f"u{i % 800}", "sku-1", 1, f"k{i}"))
                for i in range(2_000)
            )
        )
        sold = [r[1] for r in results if r[0] == "ok"]
        assert len(sold) == 100
        assert len({shape[1] for shape in sold}) == 100, "a user bought twice (limit 1)"
        assert {r[1] for r in results if r[0] == "rejected"} <= {"SoldOut", "LimitExceeded"}
        if batch > 1:
            assert calls["batch"] >= 2_000 // batch, calls  # it did coalesce
        else:
            assert calls == {"reserve_stock": 2_000}
        await assert_invariants(engine, "sale")
