"""The durable reads, written once for every backend over its ``_fetch``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from engine.models import Campaign, Order, Team, from_ms, to_ms
from engine.store import Archive, Batch, StoredOrder, TeamFill, Totals
from engine.store import schema as sql
from engine.store.rows import Row, campaign_from, order_from, team_from


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

    async def archive_of(self, campaign_id: str) -> Archive | None:
        rows = await self._fetch(sql.GET_ARCHIVE, campaign_id)
        if not rows:
            return None
        row = rows[0]
        return Archive(
            row["campaign_id"],
            from_ms(row["archived_at"]),
            json.loads(row["sold_out"]),
            json.loads(row["rejections"]),
        )

    async def archive_candidates(self, before: datetime) -> list[str]:
        at = to_ms(before)
        return [r["id"] for r in await self._fetch(sql.ARCHIVE_CANDIDATES, at, at, at)]

    async def get_team(self, team_id: str) -> Team | None:
        rows = await self._fetch(sql.GET_TEAM, team_id)
        return team_from(rows[0]) if rows else None

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
            Totals(
                r["sku"],
                r["state"],
                int(r["orders"]),
                int(r["units"]),
                int(r["amount"]),
                int(r["kept"]),
            )
            for r in rows
        ]

    async def team_totals(self, campaign_id: str) -> dict[str, int]:
        rows = await self._fetch(sql.TEAM_TOTALS, campaign_id)
        return {r["state"]: int(r["teams"]) for r in rows}

    async def team_fill(self, campaign_id: str) -> TeamFill:
        row = (await self._fetch(sql.TEAM_FILL, campaign_id))[0]
        fill = row["fill_ms"]
        return TeamFill(
            int(row["opened"] or 0),
            None if fill is None else float(fill),
            int(row["auto"] or 0),
            int(row["unfilled"] or 0),
        )

    async def marks(self, campaign_id: str) -> tuple[int, int]:
        rows = await self._fetch(sql.MARKS, campaign_id)
        return (int(rows[0]["order_seq"]), int(rows[0]["team_seq"])) if rows else (0, 0)

    async def recent_versions(self, campaign_id: str, since: datetime) -> dict[str, int]:
        at = to_ms(since)
        rows = await self._fetch(sql.RECENT_VERSIONS, campaign_id, at, campaign_id, at)
        return {r["id"]: int(r["version"]) for r in rows}

    async def campaign_orders(self, campaign_id: str) -> list[StoredOrder]:
        rows = await self._fetch(sql.CAMPAIGN_ORDERS, campaign_id)
        return [
            StoredOrder(
                order_from(r), r["idem"], None if r["restocked"] is None else bool(r["restocked"])
            )
            for r in rows
        ]

    async def campaign_teams(self, campaign_id: str) -> list[Team]:
        return [team_from(r) for r in await self._fetch(sql.CAMPAIGN_TEAMS, campaign_id)]

    async def _collisions(self, batch: Batch, written: int) -> list[str]:
        """The ids of ``batch`` the store holds for a different order or team; looked for
        only when fewer rows were written than the batch holds (replays or collisions)."""
        if written >= len(batch.orders) + len(batch.teams):
            return []
        found: list[str] = []
        for table, entries in (("orders", batch.orders), ("teams", batch.teams)):
            ids = list(entries)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = await self._fetch_raw(sql.identities(table, self._mark, len(chunk)), chunk)
                key, owner = sql.IDENTITY_KEY[table], sql.IDENTITY[table][0]
                for row in rows:
                    record = entries[row[key]][0]
                    if (_owner(record), to_ms(record.created_at)) != (
                        row[owner],
                        row["created_at"],
                    ):
                        found.append(row[key])
        return found

    async def _fetch_raw(self, statement: str, args: Sequence[Any]) -> Sequence[Row]:
        raise NotImplementedError

    def _mark(self, n: int) -> str:
        raise NotImplementedError


def _owner(record: Order | Team) -> str:
    return record.user_id if isinstance(record, Order) else record.leader_id
