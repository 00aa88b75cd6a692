"""What every part of the engine shares: settings, the Redis client, the scripts, the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from engine.models import from_ms
from engine.scripts import RedisClient, Scripts, guarded
from engine.settings import Settings
from engine.shards import Layout
from engine.store import Store


@dataclass(frozen=True, slots=True)
class Runtime:
    """The engine's shared parts, built once by ``Engine.open``."""

    settings: Settings
    redis: RedisClient
    scripts: Scripts
    store: Store
    # Each campaign's stock buckets (engine/shards.py), read from SQL once: fixed at creation.
    layouts: dict[str, Layout] = field(default_factory=dict)

    async def layout(self, campaign_id: str) -> Layout:
        """The campaign's stock buckets (one for an unsharded campaign, or one SQL does not
        know: its scripts answer for it)."""
        known = await self.known_layout(campaign_id)
        return Layout(campaign_id, (campaign_id,)) if known is None else known

    async def known_layout(self, campaign_id: str) -> Layout | None:
        """The stock buckets of a campaign SQL holds; None when it holds no such campaign."""
        known = self.layouts.get(campaign_id)
        if known is not None:
            return known
        campaign = await self.store.get_campaign(campaign_id)
        if campaign is None:
            return None
        layout = self.layouts[campaign_id] = Layout.of(campaign)
        return layout

    async def now(self) -> datetime:
        """The Redis server's clock: the one clock every script decides by."""
        seconds, micros = await guarded(self.redis.time())
        return from_ms(int(seconds) * 1000 + int(micros) // 1000)
