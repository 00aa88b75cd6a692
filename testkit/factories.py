"""Factories for campaigns (and their HTTP bodies), settings and PostgreSQL databases, shared by
tests and benchmarks."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict, Unpack

import asyncpg

from engine import Campaign, CampaignKind, Item, Settings
from engine.local.postgres import PostgresServer


async def create_database(server: PostgresServer) -> str:
    """A new, empty database on the server; returns its name."""
    name = f"t_{uuid.uuid4().hex}"
    conn: Any = await asyncpg.connect(server.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


async def deadlocks(url: str) -> int:
    """PostgreSQL's count of deadlocks it detected in the database of ``url`` (a backend
    reports its count within about a second, and when it exits)."""
    conn: Any = await asyncpg.connect(url)
    try:
        found = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return int(found or 0)


def make_settings(url: str, tmp_path: Path, **changes: object) -> Settings:
    """Test settings: a private SQLite file, no rate limit and no sold-out fast path (it
    answers sold_out for a moment after a sell-out: exact per-request outcomes are what most
    tests check) unless a test asks for them."""
    settings = Settings(
        redis_url=url, data_dir=tmp_path, rate_limit=0, reaper_interval=0.05, sold_out_ttl=0
    )
    return settings.with_(**changes) if changes else settings


class _Shape(TypedDict, total=False):
    """What a campaign of either kind is built from (``flash_campaign``'s defaults)."""

    stock: int
    limit: int
    hold_seconds: int
    starts_in: float
    lasts: float
    skus: tuple[str, ...]
    price: int
    per_order_limit: int | None


def flash_campaign(
    now: datetime,
    campaign_id: str = "sale",
    *,
    stock: int = 100,
    limit: int = 2,
    hold_seconds: int = 60,
    starts_in: float = -1.0,
    lasts: float = 3600.0,
    skus: tuple[str, ...] = ("sku-1",),
    price: int = 1999,
    per_order_limit: int | None = None,
) -> Campaign:
    """A flash campaign relative to ``now`` (the Redis clock); active by default: it started
    ``-starts_in`` seconds ago and lasts ``lasts`` seconds; no cap per order but the per-user
    limit unless ``per_order_limit``."""
    starts = now + timedelta(seconds=starts_in)
    return Campaign(
        id=campaign_id,
        kind=CampaignKind.FLASH,
        title=f"Flash sale {campaign_id}",
        starts_at=starts,
        ends_at=starts + timedelta(seconds=lasts),
        items=tuple(Item(sku, price, stock) for sku in skus),
        per_user_limit=limit,
        hold_seconds=hold_seconds,
        per_order_limit=per_order_limit,
    )


def team_campaign(
    now: datetime,
    campaign_id: str = "group",
    *,
    team_size: int = 3,
    team_ttl_seconds: int = 600,
    auto_success_min_paid: int | None = None,
    leader_price: int | None = None,
    min_pay_seconds: int | None = None,
    **shape: Unpack[_Shape],
) -> Campaign:
    """A team campaign relative to ``now``: ``flash_campaign``'s window, items, limit, holds
    and per-order cap (the same options and defaults, but a price of 990) plus the team's size
    and time to live, the paid seats that make an expiring team succeed (off by default),
    every item's leader price (none by default) and the time to pay a team must leave to be
    offered by quick-join (the engine's default unless given); active by default."""
    shape.setdefault("price", 990)
    flash = flash_campaign(now, campaign_id, **shape)
    return dataclasses.replace(
        flash,
        kind=CampaignKind.TEAM,
        title=f"Team deal {campaign_id}",
        team_size=team_size,
        team_ttl_seconds=team_ttl_seconds,
        auto_success_min_paid=auto_success_min_paid,
        min_pay_seconds=min_pay_seconds,
        items=tuple(dataclasses.replace(i, leader_price=leader_price) for i in flash.items),
    )


def rfc3339(moment: datetime) -> str:
    """``moment`` as the HTTP API writes a time: UTC, to the millisecond, with a ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def campaign_json(campaign: Campaign) -> dict[str, Any]:
    """The POST /v1/campaigns body of an engine Campaign."""
    body: dict[str, Any] = {
        "id": campaign.id,
        "kind": campaign.kind.value,
        "title": campaign.title,
        "starts_at": rfc3339(campaign.starts_at),
        "ends_at": rfc3339(campaign.ends_at),
        "items": [_item_json(i) for i in campaign.items],
        "per_user_limit": campaign.per_user_limit,
        "hold_seconds": campaign.hold_seconds,
    }
    if campaign.team_size is not None:
        body["team_size"] = campaign.team_size
        body["team_ttl_seconds"] = campaign.team_ttl_seconds
    if campaign.shards > 1:
        body["shards"] = campaign.shards
    for option in ("per_order_limit", "auto_success_min_paid", "min_pay_seconds"):
        if getattr(campaign, option) is not None:
            body[option] = getattr(campaign, option)
    return body


def _item_json(item: Item) -> dict[str, Any]:
    out: dict[str, Any] = {"sku": item.sku, "price": item.price, "stock": item.stock}
    if item.leader_price is not None:
        out["leader_price"] = item.leader_price
    return out
