"""SQLite store (the embedded default): WAL mode, schema migrated on open; batches written by a
thread of their own (``SqliteStore``).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from engine.errors import AlreadyExists, Unavailable
from engine.models import Campaign
from engine.store import Archive, Batch
from engine.store import schema as sql
from engine.store.reads import DurableReads
from engine.store.rows import archive_row, campaign_row, order_row, team_row

_Q = sql.qmark


def _upsert_all(table: str, columns: tuple[str, ...]) -> str:
    """The version-gated upsert of every row of a batch in one statement: the rows come as
    one JSON array of arrays (``json_each``), so a batch is one step of SQLite, during which
    the thread does not need Python's interpreter lock, not one step per row, each taking it
    back from a busy event loop."""
    picks = ", ".join(f"value ->> {n}" for n in range(len(columns)))
    return sql.upsert_newer(table, columns, _Q, rows=f"SELECT {picks} FROM json_each(?) WHERE true")


_UPSERT_ORDERS = _upsert_all("orders", sql.ORDER_COLUMNS)
_UPSERT_TEAMS = _upsert_all("teams", sql.TEAM_COLUMNS)
_INSERT_CAMPAIGN = sql.insert("campaigns", sql.CAMPAIGN_COLUMNS, _Q)
_REPLACE_CAMPAIGN = sql.replace_campaign(_Q)
_RAISE_MARKS = sql.raise_marks(_Q, "MAX")
_INSERT_ARCHIVE = sql.insert_archive(_Q)


# How long a batch waits for a database another process holds locked before failing.
_LOCKED_FOR = 5.0
# Its pauses between two tries: short, so that a payment takes the file in the moment between
# two of the flush worker's batches (SQLite's own busy handler sleeps up to 100 ms at a time).
_FIRST_PAUSE = 0.0002
_LONGEST_PAUSE = 0.002


class SqliteStore(DurableReads):
    """Campaigns, orders and teams in one SQLite file.

    Reads and single statements go through ``db`` (aiosqlite). Batches (the flush worker's,
    the payment ledger's group commits) are written whole, ``BEGIN IMMEDIATE`` to ``COMMIT``,
    by one call into a thread of their own on a connection of their own (``writer``): one
    hand-over between the event loop and the thread per batch, not one per statement, so a
    busy event loop does not stretch the time the file is locked for everyone else; and a
    batch whose caller stopped waiting (a timeout) still ends in COMMIT or ROLLBACK."""

    def __init__(self, db: aiosqlite.Connection, writer: sqlite3.Connection) -> None:
        self._db = db
        self._writer = writer
        # One thread: concurrent batches (two in-process flush workers, the ledger) take turns.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-batches")

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
            db = await _connect(path)
        finally:
            os.close(lock)  # releases the lock
        try:
            writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        except sqlite3.Error as exc:
            await db.close()
            raise Unavailable(f"cannot open SQLite database {path}: {exc}", service="sql") from exc
        try:
            writer.execute("PRAGMA synchronous=NORMAL")  # per connection; WAL is the file's
        except BaseException:
            writer.close()
            await db.close()
            raise
        return cls(db, writer)

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._writer.close)
        finally:
            self._thread.shutdown(wait=False)
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
        """One autocommitted statement (on ``db``: batches are on a connection of their own,
        so it never lands inside one; it waits for theirs through the busy timeout)."""
        try:
            await self._db.execute(statement, row)
        except sqlite3.IntegrityError:
            raise
        except Exception as exc:
            raise Unavailable(f"SQLite write failed: {_reason(exc)}", service="sql") from exc

    def _mark(self, n: int) -> str:
        return sql.qmark(n)

    async def apply(self, batch: Batch) -> list[str]:
        try:
            done = asyncio.get_running_loop().run_in_executor(self._thread, self._apply, batch)
        except RuntimeError as exc:  # the thread was shut down: the store is closed
            raise Unavailable("SQLite write failed: the store is closed", service="sql") from exc
        return await self._collisions(batch, await done)

    def _apply(self, batch: Batch) -> int:
        """Write the batch in one transaction (in the batch thread); returns the order and
        team rows written."""
        db = self._writer
        idem, restocked = batch.idem, batch.restocked
        try:
            _begin(db)
            orders = db.execute(
                _UPSERT_ORDERS,
                _json(
                    [
                        order_row(o, at, idem.get(i), restocked.get(i))
                        for i, (o, at) in batch.orders.items()
                    ]
                ),
            ).rowcount
            teams = db.execute(
                _UPSERT_TEAMS, _json([team_row(t, at) for t, at in batch.teams.values()])
            ).rowcount
            db.executemany(
                sql.query(sql.INVALIDATE, _Q),
                [(at, cid) for cid, at in batch.invalidations.items()],
            )
            db.executemany(_RAISE_MARKS, [(c, o, t) for c, (o, t) in batch.marks().items()])
            db.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(Exception):  # the connection may be what failed
                if db.in_transaction:
                    db.execute("ROLLBACK")
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(f"SQLite write failed: {_reason(exc)}", service="sql") from exc
        return max(orders, 0) + max(teams, 0)

    async def _fetch(self, template: str, *args: Any) -> list[sqlite3.Row]:
        return await self._fetch_raw(sql.query(template, _Q), args)

    async def _fetch_raw(self, statement: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        """One query, run and read to its end in one call into aiosqlite's thread. Never a
        cursor left open across an await: while any statement of a connection is open, its
        read transaction is, and every other read of that connection (the concurrent reads
        of other requests) would see the database as it was when that one began, missing
        what was committed since (a payment acknowledged a moment ago)."""
        try:
            return list(await self._db.execute_fetchall(statement, args))
        except Exception as exc:
            raise Unavailable(f"SQLite read failed: {_reason(exc)}", service="sql") from exc


def _reason(exc: Exception) -> str:
    """sqlite3's message, or the type and message of anything unexpected."""
    return str(exc) if isinstance(exc, sqlite3.Error) else f"({type(exc).__name__}) {exc}"


def _json(rows: list[tuple[Any, ...]]) -> tuple[str]:
    """The parameter of ``_upsert_all``: the rows as one JSON text."""
    return (msgspec.json.encode(rows).decode(),)


def _begin(db: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, tried again while another connection (the API workers' payments, the
    flush worker) holds the file, with pauses of a millisecond or two, for up to
    ``_LOCKED_FOR`` seconds: then Unavailable."""
    started = time.monotonic()
    pause = _FIRST_PAUSE
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        waited = time.monotonic() - started
        if waited >= _LOCKED_FOR:
            raise Unavailable(
                f"SQLite write failed: the database stayed locked for {waited:.1f} s",
                service="sql",
            )
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_PAUSE)


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
