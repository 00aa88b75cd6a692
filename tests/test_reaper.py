"""The reaper as it runs in production: a loop, two of them at once, against real deadlines."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from engine import Engine, OrderState, ValidationError
from engine.events import Event
from engine.keys import keys_of
from testkit.factories import flash_campaign, team_campaign
from testkit.helpers import assert_invariants, stream_events


async def _expired_events(engine: Engine, campaign_id: str, count: int) -> list[Event]:
    """Block on the campaign stream until ``count`` order.expired events arrived."""
    stream = keys_of(campaign_id).events
    last, found = "0", list[Event]()
    while len(found) < count:
        streams = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            await engine.runtime.redis.xread({stream: last}, block=5000),
        )
        assert streams, "no event within 5 s"
        for entry_id, fields in streams[0][1]:
            last = entry_id
            event = Event.decode(entry_id, fields)
            if event.type == "order.expired":
                found.append(event)
    return found


async def test_two_reaper_loops_expire_each_hold_once_within_a_second(engine: Engine) -> None:
    await engine.campaigns.create(
        flash_campaign(await engine.runtime.now(), stock=50, limit=1, hold_seconds=1)
    )
    held = await asyncio.gather(
        *(engine.flash.reserve("sale", f"u{i}", "sku-1", 1, "k") for i in range(30))
    )
    stop = asyncio.Event()
    loops = [asyncio.create_task(engine.reaper.run(stop)) for _ in range(2)]
    try:
        events = await _expired_events(engine, "sale", 30)
    finally:
        stop.set()
        await asyncio.gather(*loops)
    assert sorted(e.order.order_id for e in events if e.order) == sorted(
        h.order.order_id for h in held
    )
    for event in events:
        assert event.order is not None
        lag_ms = event.at_ms - int(event.order.expires_at.timestamp() * 1000)
        assert 0 <= lag_ms <= 1000, f"expired {lag_ms} ms after its deadline"
    assert (await engine.orders.get(held[0].order.order_id)).state is OrderState.EXPIRED
    assert (await engine.campaigns.get("sale")).stock[0].available == 50
    await assert_invariants(engine, "sale")


async def test_every_event_in_the_stream_decodes(engine: Engine) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now))
    await engine.campaigns.create(team_campaign(now))
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k")
    await engine.orders.pay(held.order.order_id, "u1", f"p-{held.order.order_id}")
    seat = await engine.teams.open("group", "lead", "sku-1", 1, "k")
    await engine.orders.pay(seat.order.order_id, "lead", f"p-{seat.order.order_id}")
    await engine.teams.join(seat.team.team_id, "u2", "k")
    await engine.campaigns.invalidate("group")
    types = set()
    for campaign_id in ("sale", "group"):
        for event in await stream_events(engine, campaign_id):
            types.add(event.type)
            assert event.at_ms > 0
            if event.type.startswith("order."):
                assert event.order is not None and event.order.version >= 1
            if event.type.startswith("team."):
                assert event.team is not None
    assert {"order.reserved", "order.paid", "team.created", "team.opened", "team.joined"} <= types
    assert {"order.refunded", "team.failed", "campaign.invalidated"} <= types


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"type": "order.paid", "order": "sale.o1", "record": "short", "at": "1", "reason": "user"},
        {"type": "order.unknown", "at": "1", "reason": "x"},
        {"type": "campaign.invalidated", "at": "soon", "reason": "merchant"},
        {"type": "team.opened", "team": "sale.t1", "record": "a|b", "at": "1", "reason": "user"},
    ],
)
def test_a_malformed_event_is_a_validation_error(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Event.decode("1-0", fields)
