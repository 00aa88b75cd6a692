"""Durable storage: campaign definitions (the source of truth) behind one Protocol.

SQLite is the embedded default; ``open_store`` picks the backend from the settings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from engine.models import Campaign
from engine.settings import Settings


class Store(Protocol):
    """What the engine needs from a durable store."""

    async def close(self) -> None: ...

    async def insert_campaign(self, campaign: Campaign) -> None:
        """Store a new campaign; AlreadyExists if its id is taken."""

    async def replace_campaign(self, campaign: Campaign) -> None:
        """Overwrite an existing campaign's definition."""

    async def get_campaign(self, campaign_id: str) -> Campaign | None: ...

    async def campaigns_ending_after(self, moment: datetime) -> list[Campaign]:
        """Campaigns whose ``ends_at`` is later than ``moment`` (they may still need Redis)."""


async def open_store(settings: Settings) -> Store:
    """Open (and create or migrate) the store named by the settings."""
    from engine.store.sqlite import SqliteStore

    return await SqliteStore.open(settings.sqlite_path)
