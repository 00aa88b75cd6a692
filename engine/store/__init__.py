"""Durable storage behind one Protocol: campaign definitions (the source of truth), and the
orders and teams the flush worker writes from the outbox.

SQLite is the embedded default; ``FLASHTEAM_DATABASE_URL=postgresql://...`` selects
PostgreSQL. Both share one schema (``engine.store.schema``), created or migrated on open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from engine.models import Campaign, Order, Team
from engine.settings import Settings


@dataclass(slots=True)
class Batch:
    """What one flush writes in one transaction; each entry carries its event time (ms)."""

    orders: dict[str, tuple[Order, int]] = field(default_factory=dict)
    teams: dict[str, tuple[Team, int]] = field(default_factory=dict)
    invalidations: dict[str, int] = field(default_factory=dict)

    def add_order(self, order: Order, at_ms: int) -> None:
        """Keep the newest version of each order: one row per order per batch."""
        known = self.orders.get(order.order_id)
        if known is None or known[0].version < order.version:
            self.orders[order.order_id] = (order, at_ms)

    def add_team(self, team: Team, at_ms: int) -> None:
        known = self.teams.get(team.team_id)
        if known is None or known[0].version < team.version:
            self.teams[team.team_id] = (team, at_ms)

    def __len__(self) -> int:
        return len(self.orders) + len(self.teams) + len(self.invalidations)


@dataclass(frozen=True, slots=True)
class Totals:
    """Orders, units and amount of one (sku, state) of a campaign."""

    sku: str
    state: str
    orders: int
    units: int
    amount: int


class Store(Protocol):
    """What the engine and the flush worker need from a durable store."""

    async def close(self) -> None: ...

    async def insert_campaign(self, campaign: Campaign) -> None:
        """Store a new campaign; AlreadyExists if its id is taken."""

    async def replace_campaign(self, campaign: Campaign) -> None:
        """Overwrite an existing campaign's definition."""

    async def get_campaign(self, campaign_id: str) -> Campaign | None: ...

    async def campaigns_ending_after(self, moment: datetime) -> list[Campaign]:
        """Campaigns whose ``ends_at`` is later than ``moment`` (they may still need Redis)."""

    async def apply(self, batch: Batch) -> None:
        """Write a batch in one transaction; a row older than the stored one is skipped."""

    async def get_order(self, order_id: str) -> Order | None: ...

    async def user_orders(self, user_id: str, limit: int = 100) -> list[Order]:
        """A user's orders, newest first, with their order type."""

    async def team_orders(self, team_id: str) -> list[Order]:
        """The orders of one team (查看同团订单), oldest first."""

    async def order_totals(self, campaign_id: str) -> list[Totals]:
        """Orders, units and amount per (sku, state): what reconcile compares with Redis."""

    async def team_totals(self, campaign_id: str) -> dict[str, int]:
        """Teams per state."""

    async def team_fill(self, campaign_id: str) -> tuple[int, float | None]:
        """Teams that opened, and the mean ms from opening to success (None: none filled)."""


async def open_store(settings: Settings) -> Store:
    """Open (and create or migrate) the store named by the settings."""
    url = settings.database_url
    if url is not None and url.startswith(("postgresql://", "postgres://")):
        from engine.store.postgres import PostgresStore

        return await PostgresStore.open(url)
    from engine.store.sqlite import SqliteStore

    return await SqliteStore.open(settings.sqlite_path)
