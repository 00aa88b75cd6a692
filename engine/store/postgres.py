"""PostgreSQL store (``FLASHTEAM_DATABASE_URL=postgresql://...``): an asyncpg pool, the shared
schema migrated on open under an advisory lock. A large flush batch is COPied into
per-connection temporary staging tables and upserted from them (``_Upsert``): the connections
must be PostgreSQL sessions of their own (a pooler in transaction mode, which would hand the
staging tables to another session, is not supported).

Every asyncpg, socket and PostgreSQL failure, and any other exception of a call, is translated
into ``Unavailable`` at one place (``_translated``), so the flush worker backs off and retries
through an outage. The pool
replaces broken connections on its own: after PostgreSQL restarts, the next call reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from engine.errors import AlreadyExists, EngineError, Unavailable
from engine.models import Campaign
from engine.store import Archive, Batch
from engine.store import schema as sql
from engine.store.reads import DurableReads
from engine.store.rows import (
    Row,
    archive_row,
    campaign_row,
    order_row,
    team_row,
)

_D = sql.dollar
# Column types of unnest's arrays and of the staging tables; every other column is text.
_TYPES = dict.fromkeys(
    ("qty", "size", "held", "paid", "version", "restocked"), "int"
) | dict.fromkeys(("amount", "created_at", "opened_at", "expires_at", "updated_at"), "bigint")
# From this many rows of a table on, a batch goes through COPY: below it, COPY's extra round
# trips cost more than it saves (a payment's commit is a few rows;
# docs/performance.md#t4-flush-worker).
_COPY_FROM = 200


@dataclass(frozen=True, slots=True)
class _Upsert:
    """A table's version-gated upsert of a whole batch in one statement: one plan and one
    executor start-up per batch instead of per row. The rows come as one array per column
    (unnest) or, for a large batch, COPied (binary) into ``stage``, a temporary table of the
    connection emptied at every commit, and read back in their id's byte order: either way
    in the order ``apply`` sorts them, the order the rows are locked in. Their keys are unique
    within a batch (a Batch keeps the newest version of each id), as ON CONFLICT needs."""

    table: str
    columns: tuple[str, ...]

    @property
    def stage(self) -> str:
        return f"flush_{self.table}"

    @property
    def create_stage(self) -> str:
        columns = ", ".join(f"{c} {_TYPES.get(c, 'text')}" for c in self.columns)
        return f"CREATE TEMP TABLE {self.stage} ({columns}) ON COMMIT DELETE ROWS"

    @property
    def from_arrays(self) -> str:
        types = (_TYPES.get(column, "text") for column in self.columns)
        arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
        return sql.upsert_newer(
            self.table, self.columns, _D, rows=f"SELECT * FROM unnest({arrays})"
        )

    @property
    def from_stage(self) -> str:
        rows = (
            f"SELECT {', '.join(self.columns)} FROM {self.stage}"
            f' ORDER BY {self.columns[0]} COLLATE "C"'
        )
        return sql.upsert_newer(self.table, self.columns, _D, rows=rows)

    async def write(self, conn: Any, rows: list[tuple[Any, ...]]) -> int:
        """Upsert ``rows`` inside the caller's transaction; returns the rows written."""
        if len(rows) < _COPY_FROM:
            return _rows(await conn.execute(self.from_arrays, *zip(*rows, strict=True)))
        await conn.copy_records_to_table(self.stage, records=rows, columns=self.columns)
        return _rows(await conn.execute(self.from_stage))


_ORDERS = _Upsert("orders", sql.ORDER_COLUMNS)
_TEAMS = _Upsert("teams", sql.TEAM_COLUMNS)
_INSERT_CAMPAIGN = sql.insert("campaigns", sql.CAMPAIGN_COLUMNS, _D)
_REPLACE_CAMPAIGN = sql.replace_campaign(_D)
_INVALIDATE = sql.query(sql.INVALIDATE, _D)
_RAISE_MARKS = sql.raise_marks(_D, "GREATEST")
_INSERT_ARCHIVE = sql.insert_archive(_D)

# Held for the migration's transaction, so processes opening the store at once take turns.
_MIGRATION_LOCK = 0x66_6C_61_73_68_74_6D  # "flashtm"
_CONNECT_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 10.0
# No statement waits longer for PostgreSQL (a stalled server, a partition without a reset): it
# fails as Unavailable and the flush worker retries, instead of hanging forever.
_COMMAND_TIMEOUT = 30.0

# What "PostgreSQL cannot be reached right now" looks like: sockets (refused, reset, timed out),
# class 08 connection exceptions, class 57 operator intervention (admin shutdown, cannot connect
# now: starting up or shutting down), class 53 insufficient resources, class 40 serialization
# failures and deadlocks, asyncpg's own "connection is closed" / "pool is closing", and its
# internal state errors after a connection broke mid-call ("cannot switch to state ...").
_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, TimeoutError (asyncio's too) are OSErrors
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# A write that lost a serialization conflict or a deadlock is rolled back by PostgreSQL and run
# again here, up to this many times in all, before it is reported unavailable.
_WRITE_ATTEMPTS = 5


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn any PostgreSQL or asyncpg failure into ``Unavailable`` (chained), the only place
    that does: callers never see asyncpg's exceptions, as with SqliteStore.

    Outages, any other server-reported error and, last, any other exception a call raises
    (asyncpg's internal errors are not all documented): the flush worker and the payment
    ledger back off and retry on Unavailable, they never die of a store fault. The engine's
    own errors (AlreadyExists) pass through."""
    try:
        yield
    except EngineError:
        raise
    except _OUTAGES as exc:
        raise Unavailable(f"PostgreSQL unavailable ({what}): {exc}", service="sql") from exc
    except asyncpg.PostgresError as exc:
        raise Unavailable(
            f"PostgreSQL {what} failed [{exc.sqlstate}]: {exc}", service="sql"
        ) from exc
    except Exception as exc:
        raise Unavailable(
            f"PostgreSQL {what} failed ({type(exc).__name__}): {exc}", service="sql"
        ) from exc


class PostgresStore(DurableReads):
    """Campaigns, orders and teams in one PostgreSQL database, over a small asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect a pool (min 1, max 4 connections; each statement bounded by
        ``_COMMAND_TIMEOUT``) and migrate the schema."""
        with _translated("open"):
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=4,
                init=_create_stages,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
            )
        try:
            with _translated("migration"):
                async with pool.acquire() as conn:
                    await _migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        return cls(pool)

    async def close(self) -> None:
        """Close the pool gracefully; terminate it if that hangs (server gone)."""
        try:
            await asyncio.wait_for(self._pool.close(), _CLOSE_TIMEOUT)
        except (TimeoutError, *_OUTAGES, asyncpg.PostgresError):
            self._pool.terminate()

    async def insert_campaign(self, campaign: Campaign) -> None:
        with _translated("insert campaign"):
            try:
                await self._pool.execute(_INSERT_CAMPAIGN, *campaign_row(campaign))
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(
                    f"campaign {campaign.id} already exists", id=campaign.id
                ) from exc

    async def replace_campaign(self, campaign: Campaign) -> None:
        with _translated("replace campaign"):
            await self._pool.execute(_REPLACE_CAMPAIGN, *campaign_row(campaign))

    async def archive(self, archive: Archive) -> None:
        with _translated("archive"):
            await self._pool.execute(_INSERT_ARCHIVE, *archive_row(archive))

    def _mark(self, n: int) -> str:
        return sql.dollar(n)

    async def apply(self, batch: Batch) -> list[str]:
        """Every row is written in one order, by table (orders, teams, campaigns, marks) and
        by id within each: the payment ledger's commits and the flush worker's batches lock
        the rows they share in the same order, so they wait for each other but never
        deadlock. A deadlock or serialization failure that still happens (another writer) is
        run again, up to ``_WRITE_ATTEMPTS`` times."""
        idem, restocked = batch.idem, batch.restocked
        orders = [
            order_row(o, at, idem.get(i), restocked.get(i))
            for i, (o, at) in sorted(batch.orders.items())
        ]
        teams = [team_row(t, at) for _, (t, at) in sorted(batch.teams.items())]
        invalidations = [(at, cid) for cid, at in sorted(batch.invalidations.items())]
        marks = [(c, o, t) for c, (o, t) in sorted(batch.marks().items())]
        with _translated("write"):
            for attempt in range(1, _WRITE_ATTEMPTS + 1):
                try:
                    written = await self._write(orders, teams, invalidations, marks)
                    break
                except asyncpg.exceptions.TransactionRollbackError:
                    if attempt == _WRITE_ATTEMPTS:
                        raise
                    await asyncio.sleep(random.uniform(0, 0.005 * attempt))
        return await self._collisions(batch, written)

    async def _write(
        self,
        orders: list[tuple[Any, ...]],
        teams: list[tuple[Any, ...]],
        invalidations: list[tuple[int, str]],
        marks: list[tuple[str, int, int]],
    ) -> int:
        """One transaction; returns the order and team rows written."""
        written = 0
        async with self._pool.acquire() as conn, conn.transaction():
            if orders:
                written += await _ORDERS.write(conn, orders)
            if teams:
                written += await _TEAMS.write(conn, teams)
            if invalidations:
                await conn.executemany(_INVALIDATE, invalidations)
            if marks:
                await conn.executemany(_RAISE_MARKS, marks)
        return written

    async def _fetch(self, template: str, *args: Any) -> list[Row]:
        return await self._fetch_raw(sql.query(template, _D), args)

    async def _fetch_raw(self, statement: str, args: Sequence[Any]) -> list[Row]:
        with _translated("read"):
            rows: list[Row] = await self._pool.fetch(statement, *args)
        return rows


def _rows(status: str) -> int:
    """The row count of a command status such as ``INSERT 0 12``."""
    return int(status.rsplit(" ", 1)[-1])


async def _create_stages(conn: Any) -> None:
    """Every new connection of the pool gets its own (temporary) staging tables."""
    for upsert in (_ORDERS, _TEAMS):
        await conn.execute(upsert.create_stage)


async def _migrate(conn: Any) -> None:
    """Bring the schema to ``sql.SCHEMA_VERSION`` in one transaction, one process at a time."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(sql.VERSION_TABLE)
        row = await conn.fetchrow("SELECT version FROM schema_version")
        current = 0 if row is None else int(row["version"])
        if current >= sql.SCHEMA_VERSION:
            return
        for statements in sql.MIGRATIONS[current:]:
            for statement in statements:
                await conn.execute(statement)
        await conn.execute("DELETE FROM schema_version")
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", sql.SCHEMA_VERSION)
