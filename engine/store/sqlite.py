"""SQLite store (the embedded default): WAL mode, one connection, schema migrated on open.

Every failure of a call (sqlite3's errors, aiosqlite's on a closed connection, anything else)
is reported as ``Unavailable``, as PostgresStore does: the flush worker and the payment ledger
back off and retry, they never die of a store fault. Only a taken campaign id is
``AlreadyExists``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from engine.errors import AlreadyExists, Unavailable
from engine.models import Campaign
from engine.store import Archive, Batch
from engine.store import schema as sql
from engine.store.reads import DurableReads
from engine.store.rows import archive_row, campaign_row, order_row, team_row

_Q = sql.qmark
_UPSERT_ORDER = sql.upsert_newer("orders", sql.ORDER_COLUMNS, _Q)
_UPSERT_TEAM = sql.upsert_newer("teams", sql.TEAM_COLUMNS, _Q)
_INSERT_CAMPAIGN = sql.insert("campaigns", sql.CAMPAIGN_COLUMNS, _Q)
_REPLACE_CAMPAIGN = sql.replace_campaign(_Q)
_RAISE_MARKS = sql.raise_marks(_Q, "MAX")
_INSERT_ARCHIVE = sql.insert_archive(_Q)


# How long a write waits for a database another process holds locked before failing.
_LOCKED_FOR = 5.0


class _Locked(Exception):
    """Raised by ``SqliteStore._apply`` when another connection holds the database locked."""


class SqliteStore(DurableReads):
    """Campaigns, orders and teams in one SQLite file."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # One connection: transactions from concurrent tasks (two in-process flush workers,
        # the API writing a campaign) must take turns or they would nest.
        self._writing = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open the file (created if missing) in WAL mode and migrate it to the schema.

        Openers of one file take turns under an advisory file lock (``<file>.lock``): the
        switch to WAL and the migration must not race another process's first open, where
        SQLite answers "database is locked" without waiting."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            return cls(await _connect(path))
        finally:
            os.close(lock)  # releases the lock

    async def close(self) -> None:
        await self._db.close()

    async def insert_campaign(self, campaign: Campaign) -> None:
        try:
            await self._write(_INSERT_CAMPAIGN, campaign_row(campaign))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"campaign {campaign.id} already exists", id=campaign.id) from exc

    async def replace_campaign(self, campaign: Campaign) -> None:
        await self._write(_REPLACE_CAMPAIGN, campaign_row(campaign))

    async def archive(self, archive: Archive) -> None:
        await self._write(_INSERT_ARCHIVE, archive_row(archive))

    async def _write(self, statement: str, row: tuple[Any, ...]) -> None:
        """One autocommitted statement, never inside another task's batch transaction."""
        async with self._writing:
            try:
                await self._db.execute(statement, row)
            except sqlite3.IntegrityError:
                raise
            except Exception as exc:
                raise Unavailable(f"SQLite write failed: {_reason(exc)}", service="sql") from exc

    def _mark(self, n: int) -> str:
        return sql.qmark(n)

    async def apply(self, batch: Batch) -> list[str]:
        async with self._writing:
            written = await self._apply_retrying(batch)
            return await self._collisions(batch, written)

    async def _apply_retrying(self, batch: Batch) -> int:
        """``_apply``, again while the file is locked by another process (the API workers
        committing payments, the flush worker): SQLite answers "database is locked" at once
        in some of those races instead of waiting its busy timeout, so wait here, up to
        ``_LOCKED_FOR`` seconds, before reporting the store unavailable."""
        started = time.monotonic()
        pause = 0.005
        while True:
            try:
                return await self._apply(batch)
            except _Locked:
                waited = time.monotonic() - started  # the busy timeout's waits included
                if waited >= _LOCKED_FOR:
                    raise Unavailable(
                        f"SQLite write failed: the database stayed locked for {waited:.1f} s",
                        service="sql",
                    ) from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)

    async def _apply(self, batch: Batch) -> int:
        """Write the batch in one transaction; returns the order and team rows written."""
        db = self._db
        idem, restocked = batch.idem, batch.restocked
        try:
            await db.execute("BEGIN IMMEDIATE")
            orders = await db.executemany(
                _UPSERT_ORDER,
                [
                    order_row(o, at, idem.get(i), restocked.get(i))
                    for i, (o, at) in batch.orders.items()
                ],
            )
            teams = await db.executemany(
                _UPSERT_TEAM, [team_row(t, at) for t, at in batch.teams.values()]
            )
            await db.executemany(
                sql.query(sql.INVALIDATE, _Q),
                [(at, cid) for cid, at in batch.invalidations.items()],
            )
            await db.executemany(_RAISE_MARKS, [(c, o, t) for c, (o, t) in batch.marks().items()])
            await db.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(Exception):  # the connection may be what failed
                if db.in_transaction:
                    await db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise _Locked from exc
            raise Unavailable(f"SQLite write failed: {_reason(exc)}", service="sql") from exc
        return max(orders.rowcount, 0) + max(teams.rowcount, 0)

    async def _fetch(self, template: str, *args: Any) -> list[sqlite3.Row]:
        return await self._fetch_raw(sql.query(template, _Q), args)

    async def _fetch_raw(self, statement: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        try:
            async with self._db.execute(statement, args) as cursor:
                return list(await cursor.fetchall())
        except Exception as exc:
            raise Unavailable(f"SQLite read failed: {_reason(exc)}", service="sql") from exc


def _reason(exc: Exception) -> str:
    """sqlite3's message, or the type and message of anything unexpected."""
    return str(exc) if isinstance(exc, sqlite3.Error) else f"({type(exc).__name__}) {exc}"


async def _connect(path: Path) -> aiosqlite.Connection:
    try:
        db = await aiosqlite.connect(path, isolation_level=None, timeout=10)
    except sqlite3.Error as exc:
        raise Unavailable(f"cannot open SQLite database {path}: {exc}", service="sql") from exc
    try:
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout=10000")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await _migrate(db)
    except BaseException as exc:
        await db.close()  # on any failure, cancellation included: never leak the connection
        if isinstance(exc, sqlite3.Error):
            raise Unavailable(f"cannot open SQLite database {path}: {exc}", service="sql") from exc
        raise
    return db


async def _migrate(db: aiosqlite.Connection) -> None:
    """Bring the schema up to date under the write lock, so concurrent openers migrate once.
    Opening a database already at the current schema takes no write lock: a process starts
    while another holds it (a long write, a backup)."""
    if await _version(db) >= sql.SCHEMA_VERSION:
        return
    await db.execute("BEGIN IMMEDIATE")
    await db.execute(sql.VERSION_TABLE)
    current = await _version(db)
    if current >= sql.SCHEMA_VERSION:
        await db.execute("COMMIT")
        return
    for statements in sql.MIGRATIONS[current:]:
        for statement in statements:
            await db.execute(statement)
    await db.execute("DELETE FROM schema_version")
    await db.execute("INSERT INTO schema_version (version) VALUES (?)", (sql.SCHEMA_VERSION,))
    await db.execute("COMMIT")


async def _version(db: aiosqlite.Connection) -> int:
    """The schema version the database is at; 0 for a new one (or one that cannot be read
    without the write lock, which then reads it again under the lock)."""
    try:
        async with db.execute("SELECT version FROM schema_version") as cursor:
            row = await cursor.fetchone()
    except sqlite3.OperationalError:  # no such table yet
        return 0
    return 0 if row is None else int(row[0])
