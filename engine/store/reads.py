"""The durable reads, written once for every backend over its ``_fetch``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from engine.models import Campaign, Order, to_ms
from engine.store import Totals
from engine.store import schema as sql
from engine.store.rows import Row, campaign_from, order_from


class DurableReads:
    """Queries shared by SqliteStore and PostgresStore; ``_fetch`` runs one query template
    (``engine.store.schema``) with the backend's placeholders and maps errors to
    ``Unavailable``."""

    async def _fetch(self, template: str, *args: Any) -> Sequence[Row]:
        raise NotImplementedError

    async def get_campaign(self, campaign_id: str) -> Campaign | None:
        rows = await self._fetch(sql.GET_CAMPAIGN, campaign_id)
        return campaign_from(rows[0]) if rows else None

    async def campaigns_ending_after(self, moment: datetime) -> list[Campaign]:
        rows = await self._fetch(sql.CAMPAIGNS_ENDING_AFTER, to_ms(moment))
        return [campaign_from(r) for r in rows]

    async def get_order(self, order_id: str) -> Order | None:
        rows = await self._fetch(sql.GET_ORDER, order_id)
        return order_from(rows[0]) if rows else None

    async def user_orders(self, user_id: str, limit: int = 100) -> list[Order]:
        return [order_from(r) for r in await self._fetch(sql.USER_ORDERS, user_id, limit)]

    async def team_orders(self, team_id: str) -> list[Order]:
        return [order_from(r) for r in await self._fetch(sql.TEAM_ORDERS, team_id)]

    async def order_totals(self, campaign_id: str) -> list[Totals]:
        rows = await self._fetch(sql.ORDER_TOTALS, campaign_id)
        # int(): PostgreSQL's SUM over BIGINT is NUMERIC (a Decimal).
        return [
            Totals(r["sku"], r["state"], int(r["orders"]), int(r["units"]), int(r["amount"]))
            for r in rows
        ]

    async def team_totals(self, campaign_id: str) -> dict[str, int]:
        rows = await self._fetch(sql.TEAM_TOTALS, campaign_id)
        return {r["state"]: int(r["teams"]) for r in rows}

    async def team_fill(self, campaign_id: str) -> tuple[int, float | None]:
        """Teams that opened, and the mean ms from opening to success of those that filled."""
        row = (await self._fetch(sql.TEAM_FILL, campaign_id))[0]
        fill = row["fill_ms"]
        return int(row["opened"] or 0), None if fill is None else float(fill)
