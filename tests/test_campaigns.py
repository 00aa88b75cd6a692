"""Campaign lifecycle (docs/lifecycle.md#campaign) through ``engine.campaigns``: create, edit,
invalidate, read, and warm-up from the durable store after Redis lost everything."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine import (
    AlreadyExists,
    Campaign,
    CampaignKind,
    CampaignStatus,
    CampaignView,
    Engine,
    Invalidated,
    InvalidState,
    Item,
    LimitExceeded,
    NotEditable,
    NotFound,
    NotStarted,
    OrderState,
    ValidationError,
)
from engine.fingerprint import SETTINGS_KEY
from engine.keys import CAMPAIGN_SET, check_id, keys_of
from engine.local.redis_server import RedisServer
from engine.models import to_ms
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import age_order, assert_invariants, until

CID = "sale"
SKU = "sku-1"
KEYS = keys_of(CID)
FLOAT: Any = 19.99  # typed Any: these values are wrong on purpose
TRUE: Any = True
TEXT: Any = "tomorrow"


def definition(now: datetime, **changes: Any) -> Campaign:
    """A scheduled flash campaign ``sale`` (starts in 1 h, lasts 1 h) with ``changes``."""
    fields: dict[str, Any] = {
        "id": CID,
        "kind": CampaignKind.FLASH,
        "title": "Flash sale",
        "starts_at": now + timedelta(hours=1),
        "ends_at": now + timedelta(hours=2),
        "items": (Item(SKU, 1999, 100),),
        "per_user_limit": 2,
        "hold_seconds": 60,
    }
    fields.update(changes)
    return Campaign(**fields)


def stock(view: CampaignView, sku: str = SKU) -> tuple[int, int, int, int, int]:
    """(initial, available, held, paid, gone) of one item of the view."""
    item = next(s for s in view.stock if s.sku == sku)
    return item.initial, item.available, item.held, item.paid, item.gone


async def ended_campaign(engine: Engine) -> Campaign:
    """Create ``sale`` active for ~0.3 s and wait until it has ended."""
    view = await engine.campaigns.create(
        flash_campaign(await engine.runtime.now(), CID, starts_in=-1, lasts=1.3)
    )
    await until(engine.runtime.now, view.campaign.ends_at)
    return view.campaign


# --------------------------------------------------------------------------- create


async def test_create_active_campaign_reports_active_with_live_stock(
    engine: Engine, redis: aioredis.Redis
) -> None:
    campaign = flash_campaign(await engine.runtime.now(), CID, stock=7, skus=(SKU, "sku-2"))
    view = await engine.campaigns.create(campaign)
    assert view.status is CampaignStatus.ACTIVE
    assert view.campaign == campaign
    assert [stock(view, sku) for sku in (SKU, "sku-2")] == [(7, 7, 0, 0, 0)] * 2
    assert [s.price for s in view.stock] == [1999, 1999]
    assert await redis.hget(KEYS.inv, f"a:{SKU}") == "7"
    assert await redis.sismember(CAMPAIGN_SET, CID)
    held = await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
    assert held.order.state is OrderState.HELD
    assert stock(await engine.campaigns.get(CID)) == (7, 6, 1, 0, 0)
    await assert_invariants(engine, CID)


async def test_create_scheduled_campaign_is_warmed_before_its_start(
    engine: Engine, redis: aioredis.Redis
) -> None:
    campaign = definition(await engine.runtime.now())
    view = await engine.campaigns.create(campaign)
    assert view.status is CampaignStatus.SCHEDULED
    assert stock(view) == (100, 100, 0, 0, 0)
    meta = await redis.hgetall(KEYS.meta)
    assert int(meta["starts"]) == to_ms(campaign.starts_at)
    assert int(meta["ends"]) == to_ms(campaign.ends_at)
    assert await redis.hget(KEYS.inv, f"a:{SKU}") == "100"
    with pytest.raises(NotStarted):
        await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
    assert (await engine.campaigns.get(CID)).status is CampaignStatus.SCHEDULED
    await assert_invariants(engine, CID)


async def test_duplicate_campaign_id_already_exists(engine: Engine, redis: aioredis.Redis) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(definition(now))
    with pytest.raises(AlreadyExists) as caught:
        await engine.campaigns.create(definition(now, title="Another", items=(Item(SKU, 1, 5),)))
    assert caught.value.code == "already_exists"
    view = await engine.campaigns.get(CID)
    assert view.campaign.title == "Flash sale"
    assert stock(view) == (100, 100, 0, 0, 0)


_INVALID: dict[str, Callable[[datetime], Campaign]] = {
    "id-open-brace": lambda now: definition(now, id="sa{le"),
    "id-close-brace": lambda now: definition(now, id="sa}le"),
    "id-colon": lambda now: definition(now, id="sa:le"),
    "id-space": lambda now: definition(now, id="sa le"),
    "id-65-chars": lambda now: definition(now, id="s" * 65),
    "id-empty": lambda now: definition(now, id=""),
    "ends-before-starts": lambda now: definition(now, ends_at=now + timedelta(minutes=30)),
    "ends-at-starts": lambda now: definition(now, ends_at=now + timedelta(hours=1)),
    "naive-datetime": lambda now: definition(now, starts_at=now.replace(tzinfo=None)),
    "empty-items": lambda now: definition(now, items=()),
    "duplicate-skus": lambda now: definition(now, items=(Item(SKU, 1, 1), Item(SKU, 2, 2))),
    "negative-price": lambda now: definition(now, items=(Item(SKU, -1, 10),)),
    "negative-stock": lambda now: definition(now, items=(Item(SKU, 100, -1),)),
    "float-price": lambda now: definition(now, items=(Item(SKU, FLOAT, 10),)),
    "sku-with-brace": lambda now: definition(now, items=(Item("sku{1}", 1, 10),)),
    "bool-limit": lambda now: definition(now, per_user_limit=TRUE),
    "zero-limit": lambda now: definition(now, per_user_limit=0),
    "zero-hold": lambda now: definition(now, hold_seconds=0),
    "empty-title": lambda now: definition(now, title=""),
    "team-size-on-flash": lambda now: definition(now, team_size=3),
    "team-ttl-on-flash": lambda now: definition(now, team_ttl_seconds=600),
    "team-without-size": lambda now: definition(now, kind=CampaignKind.TEAM, team_ttl_seconds=600),
    "team-without-ttl": lambda now: definition(now, kind=CampaignKind.TEAM, team_size=3),
    "team-of-one": lambda now: definition(
        now, kind=CampaignKind.TEAM, team_size=1, team_ttl_seconds=600
    ),
    "unknown-kind": lambda now: definition(now, kind="auction"),
}


@pytest.mark.parametrize("build", list(_INVALID.values()), ids=list(_INVALID))
async def test_invalid_definition_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis, build: Callable[[datetime], Campaign]
) -> None:
    now = await engine.runtime.now()
    with pytest.raises(ValidationError):
        await engine.campaigns.create(build(now))
    assert await redis.keys() == [SETTINGS_KEY]  # only what the engine's start published


@pytest.mark.parametrize(
    "changes",
    [
        {"starts_at": -7200.0, "ends_at": -3600.0},
        {"starts_at": -3600.0, "ends_at": 0.0},
    ],
    ids=["ended-an-hour-ago", "ends-now"],
)
async def test_create_with_ends_at_in_the_past_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis, changes: dict[str, float]
) -> None:
    now = await engine.runtime.now()
    campaign = definition(now, **{k: now + timedelta(seconds=v) for k, v in changes.items()})
    with pytest.raises(ValidationError) as caught:
        await engine.campaigns.create(campaign)
    assert caught.value.details == {"field": "ends_at"}
    with pytest.raises(NotFound):
        await engine.campaigns.get(CID)
    assert await redis.keys() == [SETTINGS_KEY]  # only what the engine's start published


async def test_create_of_an_invalidated_definition_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis
) -> None:
    now = await engine.runtime.now()
    with pytest.raises(ValidationError):
        await engine.campaigns.create(definition(now, invalidated_at=now))
    with pytest.raises(NotFound):
        await engine.campaigns.get(CID)


async def test_kind_given_as_a_plain_string_is_validated_like_the_enum(engine: Engine) -> None:
    """A str kind must be coerced or refused; never accepted unchecked (a str has no .value)."""
    now = await engine.runtime.now()
    with pytest.raises(ValidationError):
        definition(now, kind="team")  # a team campaign without team_size or team_ttl_seconds
    team = definition(now, kind="team", team_size=3, team_ttl_seconds=600)
    view = await engine.campaigns.create(team)
    assert view.campaign.kind is CampaignKind.TEAM
    assert view.status is CampaignStatus.SCHEDULED


# --------------------------------------------------------------------------- update


async def test_scheduled_campaign_accepts_every_field_and_its_new_stock_is_live(
    engine: Engine, redis: aioredis.Redis
) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(definition(now))
    starts, ends = now + timedelta(hours=3), now + timedelta(hours=5)
    view = await engine.campaigns.update(
        CID,
        {
            "title": "Bigger sale",
            "items": [{"sku": SKU, "price": 500, "stock": 7}, Item("sku-2", 250, 3)],
            "starts_at": starts,
            "ends_at": ends,
            "per_user_limit": 4,
            "hold_seconds": 30,
        },
    )
    campaign = view.campaign
    assert view.status is CampaignStatus.SCHEDULED
    assert (campaign.title, campaign.per_user_limit, campaign.hold_seconds) == (
        "Bigger sale",
        4,
        30,
    )
    assert (campaign.starts_at, campaign.ends_at) == (starts, ends)
    assert campaign.items == (Item(SKU, 500, 7), Item("sku-2", 250, 3))
    assert [stock(view, sku) for sku in (SKU, "sku-2")] == [(7, 7, 0, 0, 0), (3, 3, 0, 0, 0)]
    meta = await redis.hgetall(KEYS.meta)
    assert (int(meta["starts"]), int(meta["ends"])) == (to_ms(starts), to_ms(ends))
    assert (meta["limit"], meta["hold"]) == ("4", "30000")
    inv = await redis.hgetall(KEYS.inv)
    assert (inv[f"a:{SKU}"], inv[f"$:{SKU}"], inv["a:sku-2"], inv["$:sku-2"]) == (
        "7",
        "500",
        "3",
        "250",
    )
    assert (await engine.campaigns.get(CID)).campaign == campaign  # stored durably


async def test_scheduled_edit_can_start_the_sale_with_the_new_terms(
    engine: Engine, redis: aioredis.Redis
) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(definition(now))
    view = await engine.campaigns.update(
        CID,
        {
            "starts_at": now - timedelta(seconds=1),
            "items": [Item("sku-2", 250, 3)],
            "per_user_limit": 3,
        },
    )
    assert view.status is CampaignStatus.ACTIVE
    assert await redis.hget(KEYS.inv, f"a:{SKU}") is None  # the removed item left Redis too
    with pytest.raises(NotFound):
        await engine.flash.reserve(CID, "u1", SKU, 1, "k0")
    held = await engine.flash.reserve(CID, "u1", "sku-2", 3, "k1")
    assert held.order.amount == 750
    assert held.order.expires_at - held.order.created_at == timedelta(seconds=60)
    with pytest.raises(LimitExceeded):
        await engine.flash.reserve(CID, "u1", "sku-2", 1, "k2")
    assert stock(await engine.campaigns.get(CID), "sku-2") == (3, 0, 3, 0, 0)
    await assert_invariants(engine, CID)


async def test_active_campaign_ends_at_moves_later_keeping_live_stock(
    engine: Engine, redis: aioredis.Redis
) -> None:
    created = await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID))
    order = (await engine.flash.reserve(CID, "u1", SKU, 2, "k1")).order
    later = created.campaign.ends_at + timedelta(hours=1)

    view = await engine.campaigns.update(CID, {"ends_at": later})
    assert view.status is CampaignStatus.ACTIVE
    assert view.campaign.ends_at == later
    assert view.campaign.starts_at == created.campaign.starts_at
    assert int(await redis.hget(KEYS.meta, "ends") or 0) == to_ms(later)
    assert stock(view) == (100, 98, 2, 0, 0)  # the extension reset nothing
    assert (await engine.orders.get(order.order_id)).state is OrderState.HELD
    assert (await engine.campaigns.get(CID)).campaign.ends_at == later
    await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    await assert_invariants(engine, CID)


async def test_active_campaign_ends_at_cannot_move_earlier(
    engine: Engine, redis: aioredis.Redis
) -> None:
    created = await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID))
    earlier = created.campaign.ends_at - timedelta(minutes=10)
    with pytest.raises(NotEditable):
        await engine.campaigns.update(CID, {"ends_at": earlier})
    view = await engine.campaigns.get(CID)
    assert view.campaign == created.campaign
    assert int(await redis.hget(KEYS.meta, "ends") or 0) == to_ms(created.campaign.ends_at)


_ACTIVE_EDITS: dict[str, dict[str, Any]] = {
    "title": {"title": "Renamed"},
    "items": {"items": [Item(SKU, 1999, 500)]},
    "stock-of-the-same-item": {"items": [{"sku": SKU, "price": 1999, "stock": 100}]},
    "starts_at": {"starts_at": "later"},
    "per_user_limit": {"per_user_limit": 5},
    "hold_seconds": {"hold_seconds": 10},
    "ends_at-and-title": {"ends_at": "later", "title": "Renamed"},
}


@pytest.mark.parametrize("changes", list(_ACTIVE_EDITS.values()), ids=list(_ACTIVE_EDITS))
async def test_active_campaign_rejects_edits_other_than_ends_at(
    engine: Engine, redis: aioredis.Redis, changes: dict[str, Any]
) -> None:
    created = await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID))
    await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
    later = created.campaign.ends_at + timedelta(hours=1)
    changes = {k: later if v == "later" else v for k, v in changes.items()}
    with pytest.raises(NotEditable):
        await engine.campaigns.update(CID, changes)
    view = await engine.campaigns.get(CID)
    assert view.campaign == created.campaign
    assert stock(view) == (100, 99, 1, 0, 0)
    await assert_invariants(engine, CID)


async def test_ended_campaign_is_immutable(engine: Engine, redis: aioredis.Redis) -> None:
    campaign = await ended_campaign(engine)
    for changes in (
        {"ends_at": campaign.ends_at + timedelta(hours=1)},
        {"title": "Too late"},
    ):
        with pytest.raises(NotEditable):
            await engine.campaigns.update(CID, changes)
    with pytest.raises(NotEditable):
        await engine.campaigns.invalidate(CID)
    view = await engine.campaigns.get(CID)
    assert view.status is CampaignStatus.ENDED
    assert view.campaign == campaign
    assert int(await redis.hget(KEYS.meta, "invalid") or 0) == 0


@pytest.mark.parametrize("starts_in", [3600.0, -1.0], ids=["scheduled", "active"])
async def test_invalidated_campaign_is_immutable(
    engine: Engine, redis: aioredis.Redis, starts_in: float
) -> None:
    created = await engine.campaigns.create(
        flash_campaign(await engine.runtime.now(), CID, starts_in=starts_in)
    )
    invalidated = await engine.campaigns.invalidate(CID)
    assert invalidated.status is CampaignStatus.INVALIDATED
    for changes in (
        {"ends_at": created.campaign.ends_at + timedelta(hours=1)},
        {"title": "Revived"},
        {"items": [Item(SKU, 1, 1000)]},
    ):
        with pytest.raises(NotEditable):
            await engine.campaigns.update(CID, changes)
    view = await engine.campaigns.get(CID)
    assert view.status is CampaignStatus.INVALIDATED
    assert view.campaign == invalidated.campaign
    assert stock(view) == (100, 100, 0, 0, 0)
    with pytest.raises(Invalidated):
        await engine.flash.reserve(CID, "u1", SKU, 1, "k1")


@pytest.mark.parametrize(
    "changes",
    [{"bogus": 1}, {"id": "other"}, {"invalidated_at": None}, {"title": "T", "colour": "red"}],
    ids=["bogus", "id", "invalidated_at", "known-and-unknown"],
)
async def test_unknown_field_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis, changes: dict[str, Any]
) -> None:
    created = await engine.campaigns.create(definition(await engine.runtime.now()))
    with pytest.raises(ValidationError):
        await engine.campaigns.update(CID, changes)
    assert (await engine.campaigns.get(CID)).campaign == created.campaign


_BAD_EDITS: dict[str, dict[str, Any]] = {
    "bool-limit": {"per_user_limit": True},
    "empty-items": {"items": []},
    "float-price": {"items": [{"sku": SKU, "price": 19.99, "stock": 1}]},
    "negative-stock": {"items": [{"sku": SKU, "price": 1, "stock": -1}]},
    "sku-with-brace": {"items": [{"sku": "a{b}", "price": 1, "stock": 1}]},
    "item-missing-stock": {"items": [{"sku": SKU, "price": 1}]},
    "item-extra-field": {"items": [{"sku": SKU, "price": 1, "stock": 1, "colour": "red"}]},
    "items-not-a-list-of-objects": {"items": ["sku-1"]},
    "starts_at-text": {"starts_at": "tomorrow"},
    "ends-before-starts": {"ends_at": "before-start"},
    "unknown-kind": {"kind": "auction"},
    "team-without-size": {"kind": "team"},
    "team-size-on-flash": {"team_size": 3},
}


@pytest.mark.parametrize("changes", list(_BAD_EDITS.values()), ids=list(_BAD_EDITS))
async def test_invalid_edit_value_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis, changes: dict[str, Any]
) -> None:
    created = await engine.campaigns.create(definition(await engine.runtime.now()))
    before_start = created.campaign.starts_at - timedelta(minutes=1)
    changes = {k: before_start if v == "before-start" else v for k, v in changes.items()}
    with pytest.raises(ValidationError):
        await engine.campaigns.update(CID, changes)
    view = await engine.campaigns.get(CID)
    assert view.campaign == created.campaign
    assert stock(view) == (100, 100, 0, 0, 0)


async def test_update_of_an_unknown_campaign_is_not_found(engine: Engine) -> None:
    with pytest.raises(NotFound):
        await engine.campaigns.update("nope", {"title": "x"})
    with pytest.raises(NotFound):
        await engine.campaigns.get("nope")
    with pytest.raises(NotFound):
        await engine.campaigns.invalidate("nope")


# --------------------------------------------------------------------------- invalidation


async def _sale_with_held_and_paid_orders(engine: Engine) -> tuple[str, str]:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID, limit=5))
    held = (await engine.flash.reserve(CID, "u1", SKU, 2, "k1")).order
    paid = (await engine.flash.reserve(CID, "u2", SKU, 3, "k1")).order
    await engine.orders.pay(paid.order_id, "u2", f"pay-1-{paid.order_id}")
    return held.order_id, paid.order_id


async def test_invalidate_cancels_held_orders_and_returns_their_stock(
    engine: Engine, redis: aioredis.Redis
) -> None:
    held_id, _ = await _sale_with_held_and_paid_orders(engine)
    view = await engine.campaigns.invalidate(CID)
    assert view.status is CampaignStatus.INVALIDATED
    # docs/lifecycle.md#campaign: held orders are cancelled and their stock returned by the
    # invalidation itself.
    assert stock(view) == (100, 97, 0, 3, 0)
    assert (await engine.orders.get(held_id)).state is OrderState.CANCELLED
    assert int(await redis.hget(KEYS.users, "u1") or 0) == 0
    await assert_invariants(engine, CID)


async def test_invalidation_keeps_paid_orders_and_stops_new_orders(
    engine: Engine, redis: aioredis.Redis
) -> None:
    held_id, paid_id = await _sale_with_held_and_paid_orders(engine)
    view = await engine.campaigns.invalidate(CID)
    assert view.campaign.invalidated_at is not None
    with pytest.raises(Invalidated):
        await engine.flash.reserve(CID, "u3", SKU, 1, "k1")
    await engine.reaper.run_once()

    assert (await engine.orders.get(held_id)).state is OrderState.CANCELLED
    paid = await engine.orders.get(paid_id)
    assert (paid.state, paid.payment_ref) == (OrderState.PAID, f"pay-1-{paid_id}")
    with pytest.raises(InvalidState):
        await engine.orders.pay(held_id, "u1", f"pay-2-{held_id}")
    assert stock(await engine.campaigns.get(CID)) == (100, 97, 0, 3, 0)
    # Refunds of paid orders still work after an invalidation.
    await engine.orders.refund(paid_id, True)
    assert stock(await engine.campaigns.get(CID)) == (100, 100, 0, 0, 0)
    await assert_invariants(engine, CID)


async def test_reaper_finishes_an_invalidation_interrupted_after_its_first_step(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """A crash right after invalidate_campaign.lua: the reaper cancels the held orders."""
    held_id, _ = await _sale_with_held_and_paid_orders(engine)
    await age_order(engine, held_id, -3_600_000)  # not due for another hour
    await engine.runtime.scripts.invalidate(CID)
    assert await engine.reaper.run_once() == 1
    order = await engine.orders.get(held_id)
    assert order.state is OrderState.CANCELLED
    assert stock(await engine.campaigns.get(CID)) == (100, 97, 0, 3, 0)
    await assert_invariants(engine, CID)


async def test_invalidating_twice_is_a_no_op(engine: Engine, redis: aioredis.Redis) -> None:
    await _sale_with_held_and_paid_orders(engine)
    first = await engine.campaigns.invalidate(CID)
    await engine.reaper.run_once()
    second = await engine.campaigns.invalidate(CID)
    assert first.campaign.invalidated_at is not None
    assert second.campaign.invalidated_at == first.campaign.invalidated_at
    assert second.status is CampaignStatus.INVALIDATED
    entries: Any = await redis.xrange(KEYS.events)
    kinds = [fields["type"] for _, fields in entries]
    assert kinds.count("campaign.invalidated") == 1
    assert kinds.count("order.cancelled") == 1
    stored = (await engine.campaigns.get(CID)).campaign.invalidated_at
    assert stored == first.campaign.invalidated_at
    assert int(await redis.hget(KEYS.meta, "invalid") or 0) == to_ms(stored)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- durability


async def test_definitions_survive_an_engine_restart_on_an_empty_redis(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path)
    async with await Engine.open(settings) as first:
        now = await first.runtime.now()
        active = await first.campaigns.create(flash_campaign(now, CID, stock=5, limit=2))
        await first.campaigns.create(definition(now, id="later"))
        await first.campaigns.update("later", {"title": "Edited", "items": [Item(SKU, 10, 9)]})
        await first.campaigns.create(flash_campaign(now, "gone"))
        await first.campaigns.invalidate("gone")
        longer = active.campaign.ends_at + timedelta(hours=1)
        await first.campaigns.update(CID, {"ends_at": longer})
        await first.flash.reserve(CID, "u1", SKU, 1, "k1")

    await redis.flushall()  # Redis lost everything; SQL holds no order (nothing was flushed)
    async with await Engine.open(settings) as second:
        await second.recovery.wait_idle()  # the started campaigns are repaired from SQL
        assert second.recovery.repairs == 2

        sale = await second.campaigns.get(CID)
        assert sale.status is CampaignStatus.ACTIVE
        assert sale.campaign.ends_at == longer
        assert int(await redis.hget(KEYS.meta, "ends") or 0) == to_ms(longer)
        assert stock(sale) == (5, 5, 0, 0, 0)
        later = await second.campaigns.get("later")
        assert (later.status, later.campaign.title) == (CampaignStatus.SCHEDULED, "Edited")
        assert stock(later) == (9, 9, 0, 0, 0)
        gone = await second.campaigns.get("gone")
        assert gone.status is CampaignStatus.INVALIDATED
        assert await redis.smembers(CAMPAIGN_SET) == {CID, "later", "gone"}

        order = (await second.flash.reserve(CID, "u1", SKU, 2, "k2")).order
        assert order.state is OrderState.HELD
        with pytest.raises(Invalidated):
            await second.flash.reserve("gone", "u1", SKU, 1, "k1")
        with pytest.raises(NotStarted):
            await second.flash.reserve("later", "u1", SKU, 1, "k1")
        await assert_invariants(second, CID)


async def test_warm_all_leaves_a_running_campaign_untouched(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID, limit=5))
    order = (await engine.flash.reserve(CID, "u1", SKU, 3, "k1")).order
    await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    await engine.flash.reserve(CID, "u2", SKU, 1, "k1")
    assert [c.id for c in await engine.campaigns.warm_all()] == [CID]
    assert stock(await engine.campaigns.get(CID)) == (100, 96, 1, 3, 0)
    assert await redis.hget(KEYS.meta, "oseq") == "2"
    await assert_invariants(engine, CID)


async def test_warm_script_never_redefines_a_started_campaign(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """The Redis-side guard behind update: an edit racing the start cannot reset stock."""
    created = await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID))
    await engine.flash.reserve(CID, "u1", SKU, 2, "k1")
    scripts = engine.runtime.scripts
    with pytest.raises(NotEditable, match="started"):
        await scripts.define(created.campaign)
    earlier = created.campaign.ends_at - timedelta(milliseconds=1)
    with pytest.raises(NotEditable) as caught:
        await scripts.extend(CID, earlier)
    assert caught.value.details == {"reason": "earlier"}
    with pytest.raises(NotFound):
        await scripts.extend("nope", created.campaign.ends_at)
    assert stock(await engine.campaigns.get(CID)) == (100, 98, 2, 0, 0)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- key injection


@pytest.mark.parametrize("bad", ["c{1}", "{c}", "c}", "{", "c:1", "c 1", "", "c" * 65, "c\n"])
def test_check_id_rejects_anything_outside_the_id_pattern(bad: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_id(bad, "campaign_id")
    assert caught.value.details == {"field": "campaign_id"}


def test_check_id_accepts_the_id_pattern() -> None:
    for good in ("c", "C-1_x", "c" * 64):
        assert check_id(good, "campaign_id") == good


async def test_ids_with_braces_are_rejected_before_touching_redis(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), CID))
    order = (await engine.flash.reserve(CID, "u1", SKU, 1, "k1")).order
    size = await redis.dbsize()
    bad = "x}:{sale"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: engine.campaigns.get(bad),
        lambda: engine.campaigns.update(bad, {"title": "x"}),
        lambda: engine.campaigns.update(CID, {"items": [Item(bad, 1, 1)]}),
        lambda: engine.campaigns.invalidate(bad),
        lambda: engine.flash.reserve(bad, "u1", SKU, 1, "k2"),
        lambda: engine.flash.reserve(CID, bad, SKU, 1, "k2"),
        lambda: engine.flash.reserve(CID, "u1", bad, 1, "k2"),
        lambda: engine.flash.reserve(CID, "u1", SKU, 1, "k}{2"),
        lambda: engine.orders.pay(f"{bad}.o1", "u1", f"pay-1-{f'{bad}.o1'}"),
        lambda: engine.orders.pay(order.order_id, bad, f"pay-1-{order.order_id}"),
        lambda: engine.orders.pay(order.order_id, "u1", "p{1}"),
        lambda: engine.orders.cancel(f"{bad}.o1", "u1"),
        lambda: engine.orders.cancel(order.order_id, bad),
        lambda: engine.orders.refund(f"{bad}.o1", True),
        lambda: engine.orders.get(f"{bad}.o1"),
        lambda: engine.reaper.expire_campaign(bad),
    ]
    for call in calls:
        with pytest.raises(ValidationError):
            await call()
    assert await redis.dbsize() == size
    assert [key async for key in redis.scan_iter(match="*x}*")] == []
    assert (await engine.orders.get(order.order_id)).state is OrderState.HELD
    await assert_invariants(engine, CID)
