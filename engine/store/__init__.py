"""Durable storage behind one Protocol: campaign definitions (the source of truth), and the
orders and teams the flush worker writes from the outbox.

SQLite is the embedded default; ``FLASHTEAM_DATABASE_URL=postgresql://...`` selects
PostgreSQL. Both share one schema (``engine.store.schema``), created or migrated on open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from engine.keys import shard_of_order
from engine.models import Campaign, Order, Team
from engine.settings import Settings, redact

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Batch:
    """What one flush writes in one transaction; each entry carries its event time (ms)."""

    orders: dict[str, tuple[Order, int]] = field(default_factory=dict)
    teams: dict[str, tuple[Team, int]] = field(default_factory=dict)
    invalidations: dict[str, int] = field(default_factory=dict)
    # order id -> "<op><user>:<key>", the idempotency record of the request that created it
    idem: dict[str, str] = field(default_factory=dict)
    # refunded order id -> whether its units went back on sale
    restocked: dict[str, bool] = field(default_factory=dict)

    def add_order(
        self, order: Order, at_ms: int, *, idem: str | None = None, restocked: bool | None = None
    ) -> None:
        """Keep the newest version of each order: one row per order per batch."""
        order_id = order.order_id
        if idem:
            self.idem[order_id] = idem
        known = self.orders.get(order_id)
        if known is None or known[0].version < order.version:
            self.orders[order_id] = (order, at_ms)
            if restocked is not None:
                self.restocked[order_id] = restocked

    def add_team(self, team: Team, at_ms: int) -> None:
        known = self.teams.get(team.team_id)
        if known is None or known[0].version < team.version:
            self.teams[team.team_id] = (team, at_ms)

    def __len__(self) -> int:
        return len(self.orders) + len(self.teams) + len(self.invalidations)

    def marks(self) -> dict[str, tuple[int, int]]:
        """Per campaign, the highest order and team sequence numbers in the batch; per stock
        bucket for a sharded campaign, each bucket numbering its orders (keyed by shard id,
        ``<campaign>.b<k>``: engine/shards.py)."""
        out: dict[str, tuple[int, int]] = {}
        for order_id, (order, _) in self.orders.items():
            shard = shard_of_order(order_id)
            o, t = out.get(shard, (0, 0))
            team = sequence(order.team_id) if order.team_id else 0
            out[shard] = (max(o, sequence(order_id)), max(t, team))
        for team_row, _ in self.teams.values():
            o, t = out.get(team_row.campaign_id, (0, 0))
            out[team_row.campaign_id] = (o, max(t, sequence(team_row.team_id)))
        return out


def sequence(order_or_team_id: str) -> int:
    """The ``<n>`` of ``<campaign>.o<n>`` or ``<campaign>.t<n>``."""
    return int(order_or_team_id[order_or_team_id.rindex(".") + 2 :])


@dataclass(frozen=True, slots=True)
class StoredOrder:
    """An order as SQL keeps it, with what a repair needs beyond the order itself."""

    order: Order
    idem: str | None  # "<op><user>:<key>" of the creating request (None: unknown)
    restocked: bool | None  # a refunded order: whether its units went back on sale


@dataclass(frozen=True, slots=True)
class Totals:
    """Orders, units and amount of one (sku, state) of a campaign; ``kept``: the units of
    refunded orders whose units did not go back on sale."""

    sku: str
    state: str
    orders: int
    units: int
    amount: int
    kept: int = 0


@dataclass(frozen=True, slots=True)
class TeamFill:
    """How a campaign's teams filled: ``opened`` teams whose leader paid; ``fill_ms`` the
    mean ms from opening to success of those that filled every seat (None: none did);
    ``auto`` teams that succeeded automatically at expiry, and ``unfilled`` the seats those
    lacked (docs/kpis.md)."""

    opened: int
    fill_ms: float | None
    auto: int
    unfilled: int


@dataclass(frozen=True, slots=True)
class Archive:
    """A campaign archived out of Redis (engine.archive): SQL is its only copy from then on.
    What its reads need that only Redis had: when each item sold out (sku -> ms on the Redis
    clock) and the rejections per error code the API counted."""

    campaign_id: str
    archived_at: datetime
    sold_out: dict[str, int]
    rejections: dict[str, int]


class Store(Protocol):
    """What the engine and the flush worker need from a durable store."""

    async def close(self) -> None: ...

    async def insert_campaign(self, campaign: Campaign) -> None:
        """Store a new campaign; AlreadyExists if its id is taken."""

    async def replace_campaign(self, campaign: Campaign) -> None:
        """Overwrite an existing campaign's definition."""

    async def get_campaign(self, campaign_id: str) -> Campaign | None: ...

    async def campaigns_ending_after(self, moment: datetime) -> list[Campaign]:
        """Campaigns whose ``ends_at`` is later than ``moment`` and that are not archived
        (they may still need Redis)."""

    async def archive(self, archive: Archive) -> None:
        """Record the campaign as archived (a second call keeps the first record)."""

    async def archive_of(self, campaign_id: str) -> Archive | None:
        """The campaign's archive record; None while Redis holds the campaign."""

    async def archive_candidates(self, before: datetime) -> list[str]:
        """Campaigns not archived that ended (or were invalidated) before ``before`` and whose
        orders and teams all last changed before it too; the earliest end first."""

    async def get_team(self, team_id: str) -> Team | None: ...

    async def apply(self, batch: Batch) -> list[str]:
        """Write a batch in one transaction; a row older than the stored one is skipped, and
        so is a row whose id the store holds for a different order or team (another user or
        creation time): those ids come back, the collisions, for the caller to act on. The
        durable high-water marks (``marks``) move up in the same transaction."""

    async def marks(self, campaign_id: str) -> tuple[int, int]:
        """The highest order and team sequence numbers committed for the campaign (or for
        one stock bucket of a sharded one: its shard id)."""

    async def recent_versions(self, campaign_id: str, since: datetime) -> dict[str, int]:
        """The version of every order and team of the campaign changed at or after
        ``since``, by id."""

    async def campaign_orders(self, campaign_id: str) -> list[StoredOrder]:
        """Every order of the campaign, by id."""

    async def campaign_teams(self, campaign_id: str) -> list[Team]:
        """Every team of the campaign, by id."""

    async def get_order(self, order_id: str) -> Order | None: ...

    async def user_orders(self, user_id: str, limit: int = 100) -> list[Order]:
        """A user's orders, newest first, with their order type."""

    async def team_orders(self, team_id: str) -> list[Order]:
        """The orders of one team (查看同团订单), oldest first."""

    async def order_totals(self, campaign_id: str) -> list[Totals]:
        """Orders, units and amount per (sku, state): what reconcile compares with Redis."""

    async def team_totals(self, campaign_id: str) -> dict[str, int]:
        """Teams per state."""

    async def team_fill(self, campaign_id: str) -> TeamFill:
        """Teams that opened, the mean ms from opening to filling every seat, and the teams
        that succeeded automatically at expiry with the seats they lacked."""


def unchecked_tls(url: str) -> bool:
    """Whether a PostgreSQL URL names a host other than loopback (or a Unix socket) without
    an ``sslmode``: the driver then accepts any server certificate."""
    parts = urlsplit(url)
    if "sslmode" in parse_qs(parts.query):
        return False
    host = parts.hostname or ""
    return host not in ("", "localhost", "::1") and not host.startswith(("127.", "/"))


async def open_store(settings: Settings) -> Store:
    """Open (and create or migrate) the store named by the settings."""
    url = settings.database_url
    if url is not None and url.startswith(("postgresql://", "postgres://")):
        from engine.store.postgres import PostgresStore

        if unchecked_tls(url):
            log.warning(
                "the PostgreSQL URL %s sets no sslmode: its TLS, if any, accepts any "
                "certificate; add sslmode=verify-full (docs/operations.md#network)",
                redact(url),
            )
        return await PostgresStore.open(url)
    from engine.store.sqlite import SqliteStore

    return await SqliteStore.open(settings.sqlite_path)
