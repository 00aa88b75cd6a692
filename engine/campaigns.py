"""Campaigns: create, edit by the lifecycle rules, invalidate, read status and live stock.

SQL holds the definitions (the source of truth); Redis holds what the scripts check, warmed
at creation and again at every engine start (``warm_all``: only campaigns that have not
started; one that has and is missing is repaired from SQL instead, engine/recovery.py).
Lifecycle guards run on the Redis clock inside ``warm_campaign.lua`` so an edit racing the
start cannot reset live stock.

A sharded flash campaign (``shards``, engine/shards.py) is placed at creation (its buckets'
numbers, stored with it) and every step here runs on each of its buckets: warm-up (each with
its share of the stock), a later end, invalidation (bucket 0 first; each bucket stops selling
as its own script runs, so for a moment some may still sell while others refuse). Its live
stock is the sum over the buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from engine.archive import durable_stock
from engine.errors import AlreadyExists, NotEditable, NotFound, Recovering, ValidationError
from engine.keys import CAMPAIGN_SET, STREAM_SET, check_id, keys_of
from engine.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    CampaignView,
    Item,
    ItemStock,
    aware_utc,
    from_ms,
)
from engine.runtime import Runtime
from engine.scripts import guarded
from engine.shards import Layout, place
from engine.shards import stock as sharded_stock

EDITABLE_FIELDS = frozenset(
    {
        "kind",
        "title",
        "starts_at",
        "ends_at",
        "items",
        "per_user_limit",
        "hold_seconds",
        "team_size",
        "team_ttl_seconds",
        "per_order_limit",
        "auto_success_min_paid",
        "min_pay_seconds",
    }
)
# How long after its end a campaign may still have live state (open teams run past the end).
_LIVE_AFTER_END = timedelta(days=7, hours=1)


def _moment(ms: str | None) -> datetime | None:
    return None if ms is None else from_ms(int(ms))


class Campaigns:
    """Campaign definitions and their lifecycle (docs/lifecycle.md#campaign)."""

    def __init__(self, rt: Runtime, cascade: Callable[[str], Awaitable[object]]) -> None:
        """``cascade`` ends what an invalidation leaves open (the reaper's campaign pass)."""
        self._rt = rt
        self._cascade = cascade

    async def create(self, campaign: Campaign) -> CampaignView:
        """Store a new campaign and warm it into Redis; it sells from ``starts_at``."""
        now = await self._rt.now()
        if campaign.ends_at <= now:
            raise ValidationError("ends_at must be in the future", field="ends_at")
        if campaign.invalidated_at is not None:
            raise ValidationError("a new campaign cannot be invalidated", field="invalidated_at")
        if await self._rt.store.get_campaign(campaign.id) is not None:
            raise AlreadyExists(f"campaign {campaign.id} already exists", id=campaign.id)
        if campaign.shards > 1 and not campaign.buckets:
            buckets = await place(self._rt.redis, campaign.id, campaign.shards)
            campaign = dataclasses.replace(campaign, buckets=buckets)
        await self._rt.store.insert_campaign(campaign)
        self._rt.layouts[campaign.id] = Layout.of(campaign)
        await self._warm(campaign)
        return await self.get(campaign.id)

    async def update(self, campaign_id: str, changes: dict[str, Any]) -> CampaignView:
        """Edit a campaign: any field while scheduled (None switches an option off:
        ``per_order_limit``, ``auto_success_min_paid``), only a later ``ends_at`` while
        active."""
        unknown = set(changes) - EDITABLE_FIELDS
        if unknown:
            raise ValidationError(f"cannot edit {', '.join(sorted(unknown))}", fields=unknown)
        current = await self._load(campaign_id)
        status = current.status(await self._rt.now())
        if status in (CampaignStatus.ENDED, CampaignStatus.INVALIDATED):
            raise NotEditable(f"campaign {campaign_id} is {status}: create a new one")
        # What an active campaign cannot change is refused as such, whatever the values.
        if status is CampaignStatus.ACTIVE and set(changes) - {"ends_at"}:
            raise NotEditable("an active campaign only accepts a later ends_at")
        changes = self._coerce(changes)
        if "ends_at" in changes:
            changes["ends_at"] = aware_utc(changes["ends_at"], "ends_at")
            if changes["ends_at"] <= await self._rt.now():
                raise ValidationError("ends_at must be in the future", field="ends_at")
        if status is CampaignStatus.ACTIVE:
            edited = dataclasses.replace(current, **changes)
            await self._extend(edited)
        else:
            edited = dataclasses.replace(current, **changes)
            await self._warm(edited)
        await self._rt.store.replace_campaign(edited)
        return await self.get(campaign_id)

    async def invalidate(self, campaign_id: str) -> CampaignView:
        """End the campaign early: no new orders; held orders are cancelled, stock returned."""
        current = await self._load(campaign_id)
        if await self._rt.store.archive_of(campaign_id) is not None:
            # Archived, so over: invalidated already (a retry) or ended on its own.
            if current.invalidated_at is None:
                raise NotEditable(f"campaign {campaign_id} already ended", reason="ended")
            return await self.get(campaign_id)
        await self._warm(current, only_if_absent=True)
        invalidated_at = await self._rt.scripts.invalidate(campaign_id)
        for shard in current.shard_ids[1:]:
            await self._rt.scripts.invalidate(shard)
        if current.invalidated_at is None:
            await self._rt.store.replace_campaign(
                dataclasses.replace(current, invalidated_at=invalidated_at)
            )
        await self._cascade(campaign_id)
        return await self.get(campaign_id)

    async def get(self, campaign_id: str) -> CampaignView:
        """The definition with its live status and per-item stock."""
        campaign = await self._load(campaign_id)
        keys = keys_of(campaign_id)
        inv: dict[str, str] = await guarded(self._rt.redis.hgetall(keys.inv))
        now = await self._rt.now()
        if not inv:  # not in Redis: archived (SQL has it all), or not warmed yet
            archive = await self._rt.store.archive_of(campaign_id)
            if archive is not None:
                totals = await self._rt.store.order_totals(campaign_id)
                stock = durable_stock(campaign, totals, archive.sold_out)
                return CampaignView(campaign, campaign.status(now), stock, archived=True)
        if campaign.shards > 1:
            return CampaignView(
                campaign, campaign.status(now), await sharded_stock(self._rt, campaign)
            )
        stock = tuple(
            ItemStock(
                sku=item.sku,
                price=item.price,
                initial=int(inv.get(f"i:{item.sku}", item.stock)),
                available=int(inv.get(f"a:{item.sku}", item.stock)),
                held=int(inv.get(f"h:{item.sku}", 0)),
                paid=int(inv.get(f"p:{item.sku}", 0)),
                gone=int(inv.get(f"r:{item.sku}", 0)),
                sold_out_at=_moment(inv.get(f"out:{item.sku}")),
            )
            for item in campaign.items
        )
        return CampaignView(campaign, campaign.status(now), stock)

    async def warm_all(self) -> list[Campaign]:
        """Warm every campaign that may still have live state into Redis (start-up); returns
        them. A started campaign missing from Redis is not warmed (its initial stock would
        sell twice): the script refuses it and its repair from SQL starts
        (engine/recovery.py)."""
        now = await self._rt.now()
        campaigns = await self._rt.store.campaigns_ending_after(now - _LIVE_AFTER_END)
        for campaign in campaigns:
            with contextlib.suppress(Recovering):
                await self._warm(campaign, only_if_absent=True)
        return campaigns

    async def _load(self, campaign_id: str) -> Campaign:
        campaign = await self._rt.store.get_campaign(check_id(campaign_id, "campaign_id"))
        if campaign is None:
            raise NotFound(f"no campaign {campaign_id}", id=campaign_id)
        return campaign

    @staticmethod
    def _coerce(changes: dict[str, Any]) -> dict[str, Any]:
        out = dict(changes)
        if "kind" in out:
            try:
                out["kind"] = CampaignKind(out["kind"])
            except ValueError as exc:
                raise ValidationError("kind must be 'flash' or 'team'", field="kind") from exc
        if "items" in out:
            out["items"] = tuple(_item(i) for i in _listed(out["items"]))
        return out

    async def _warm(self, campaign: Campaign, *, only_if_absent: bool = False) -> None:
        """Load the definition into Redis (unless there already, ``only_if_absent``) and
        register the campaign with the reaper and the flush worker."""
        for index in range(campaign.shards):
            await self._rt.scripts.define(campaign, only_if_absent=only_if_absent, index=index)
        await guarded(self._rt.redis.sadd(CAMPAIGN_SET, campaign.id))
        await guarded(self._rt.redis.sadd(STREAM_SET, campaign.id))

    async def _extend(self, campaign: Campaign) -> None:
        for shard in campaign.shard_ids:
            await self._rt.scripts.extend(shard, campaign.ends_at)


_ITEM_FIELDS = frozenset({"sku", "price", "stock"})
_ITEM_OPTIONS = _ITEM_FIELDS | {"leader_price"}


def _listed(value: object) -> list[object]:
    if not isinstance(value, list | tuple):
        raise ValidationError(
            "items must be a list of {sku, price, stock[, leader_price]}", field="items"
        )
    return list(value)


def _item(value: object) -> Item:
    if isinstance(value, Item):
        return value
    if not isinstance(value, Mapping) or not _ITEM_FIELDS <= set(value) <= _ITEM_OPTIONS:
        raise ValidationError(
            "each item is exactly {sku, price, stock[, leader_price]}", field="items"
        )
    return Item(
        sku=value["sku"],
        price=value["price"],
        stock=value["stock"],
        leader_price=value.get("leader_price"),
    )
