"""SQLite store (the embedded default): WAL mode, one connection, schema created on open."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from engine.errors import AlreadyExists, Unavailable
from engine.models import Campaign, CampaignKind, Item, from_ms, to_ms

_SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    title            TEXT NOT NULL,
    starts_at        INTEGER NOT NULL,
    ends_at          INTEGER NOT NULL,
    per_user_limit   INTEGER NOT NULL,
    hold_seconds     INTEGER NOT NULL,
    team_size        INTEGER,
    team_ttl_seconds INTEGER,
    invalidated_at   INTEGER,
    items            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS campaigns_ends_at ON campaigns (ends_at);
"""

_COLUMNS = (
    "id, kind, title, starts_at, ends_at, per_user_limit, hold_seconds, team_size,"
    " team_ttl_seconds, invalidated_at, items"
)


def _row(campaign: Campaign) -> tuple[Any, ...]:
    items = [{"sku": i.sku, "price": i.price, "stock": i.stock} for i in campaign.items]
    invalidated = campaign.invalidated_at
    return (
        campaign.id,
        campaign.kind.value,
        campaign.title,
        to_ms(campaign.starts_at),
        to_ms(campaign.ends_at),
        campaign.per_user_limit,
        campaign.hold_seconds,
        campaign.team_size,
        campaign.team_ttl_seconds,
        None if invalidated is None else to_ms(invalidated),
        json.dumps(items),
    )


def _campaign(row: sqlite3.Row) -> Campaign:
    return Campaign(
        id=row["id"],
        kind=CampaignKind(row["kind"]),
        title=row["title"],
        starts_at=from_ms(row["starts_at"]),
        ends_at=from_ms(row["ends_at"]),
        items=tuple(Item(**item) for item in json.loads(row["items"])),
        per_user_limit=row["per_user_limit"],
        hold_seconds=row["hold_seconds"],
        team_size=row["team_size"],
        team_ttl_seconds=row["team_ttl_seconds"],
        invalidated_at=None if row["invalidated_at"] is None else from_ms(row["invalidated_at"]),
    )


class SqliteStore:
    """Campaign definitions in one SQLite file."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(path)
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.executescript(_SCHEMA)
            await db.commit()
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open SQLite database {path}: {exc}") from exc
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def insert_campaign(self, campaign: Campaign) -> None:
        try:
            await self._db.execute(
                f"INSERT INTO campaigns ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                _row(campaign),
            )
            await self._db.commit()
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"campaign {campaign.id} already exists", id=campaign.id) from exc

    async def replace_campaign(self, campaign: Campaign) -> None:
        await self._db.execute(
            f"INSERT OR REPLACE INTO campaigns ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            _row(campaign),
        )
        await self._db.commit()

    async def get_campaign(self, campaign_id: str) -> Campaign | None:
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM campaigns WHERE id = ?", (campaign_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _campaign(row)

    async def campaigns_ending_after(self, moment: datetime) -> list[Campaign]:
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM campaigns WHERE ends_at > ? ORDER BY starts_at",
            (to_ms(moment),),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_campaign(row) for row in rows]
