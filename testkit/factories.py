"""Factories for campaigns, settings and PostgreSQL databases, shared by tests and benchmarks."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

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


def make_settings(url: str, tmp_path: Path, **changes: object) -> Settings:
    """Test settings: a private SQLite file, no rate limit and no sold-out fast path (it
    answers sold_out for a moment after a sell-out: exact per-request outcomes are what most
    tests check) unless a test asks for them."""
    settings = Settings(
        redis_url=url, data_dir=tmp_path, rate_limit=0, reaper_interval=0.05, sold_out_ttl=0
    )
    return settings.with_(**changes) if changes else settings


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
) -> Campaign:
    """A flash campaign relative to ``now`` (the Redis clock); active by default."""
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
    )


def team_campaign(
    now: datetime,
    campaign_id: str = "group",
    *,
    stock: int = 100,
    limit: int = 2,
    team_size: int = 3,
    hold_seconds: int = 60,
    team_ttl_seconds: int = 600,
    starts_in: float = -1.0,
    lasts: float = 3600.0,
    skus: tuple[str, ...] = ("sku-1",),
    price: int = 990,
) -> Campaign:
    """A team campaign relative to ``now`` (the Redis clock); active by default."""
    starts = now + timedelta(seconds=starts_in)
    return Campaign(
        id=campaign_id,
        kind=CampaignKind.TEAM,
        title=f"Team deal {campaign_id}",
        starts_at=starts,
        ends_at=starts + timedelta(seconds=lasts),
        items=tuple(Item(sku, price, stock) for sku in skus),
        per_user_limit=limit,
        hold_seconds=hold_seconds,
        team_size=team_size,
        team_ttl_seconds=team_ttl_seconds,
    )
