"""The one SQL schema both backends share, its migrations, and the idempotent upserts.

Times are integer milliseconds since the epoch (the Redis clock), money integer minor units.
Orders and teams are written only by the flush worker, from outbox events, with an upsert that
applies a row only when its ``version`` is newer than the stored one: replays and out-of-order
deliveries can never move a row back to an earlier state (invariant I4, docs/invariants.md).
"""

from __future__ import annotations

from collections.abc import Callable

# Each migration moves the schema from version i to i + 1; applied in order on open.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS campaigns (
            id               TEXT PRIMARY KEY,
            kind             TEXT NOT NULL,
            title            TEXT NOT NULL,
            starts_at        BIGINT NOT NULL,
            ends_at          BIGINT NOT NULL,
            per_user_limit   INTEGER NOT NULL,
            hold_seconds     INTEGER NOT NULL,
            team_size        INTEGER,
            team_ttl_seconds INTEGER,
            invalidated_at   BIGINT,
            items            TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS campaigns_ends_at ON campaigns (ends_at)",
        """CREATE TABLE IF NOT EXISTS orders (
            order_id    TEXT PRIMARY KEY,
            campaign_id TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            sku         TEXT NOT NULL,
            qty         INTEGER NOT NULL,
            amount      BIGINT NOT NULL,
            state       TEXT NOT NULL,
            order_type  TEXT NOT NULL,
            team_id     TEXT,
            payment_ref TEXT,
            created_at  BIGINT NOT NULL,
            expires_at  BIGINT NOT NULL,
            updated_at  BIGINT NOT NULL,
            version     INTEGER NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS orders_user ON orders (user_id, created_at)",
        "CREATE INDEX IF NOT EXISTS orders_team ON orders (team_id)",
        "CREATE INDEX IF NOT EXISTS orders_campaign ON orders (campaign_id, sku, state)",
        """CREATE TABLE IF NOT EXISTS teams (
            team_id     TEXT PRIMARY KEY,
            campaign_id TEXT NOT NULL,
            leader_id   TEXT NOT NULL,
            sku         TEXT NOT NULL,
            qty         INTEGER NOT NULL,
            size        INTEGER NOT NULL,
            state       TEXT NOT NULL,
            why         TEXT,
            held        INTEGER NOT NULL,
            paid        INTEGER NOT NULL,
            created_at  BIGINT NOT NULL,
            opened_at   BIGINT,
            expires_at  BIGINT,
            updated_at  BIGINT NOT NULL,
            version     INTEGER NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS teams_campaign ON teams (campaign_id, state)",
    ),
    (
        # What a repair needs to rebuild Redis from SQL alone (engine.recovery): the
        # idempotency record of the request that created an order, whether a refund put its
        # units back on sale, a team's seats; and the durable high-water marks.
        "ALTER TABLE orders ADD COLUMN idem TEXT",
        "ALTER TABLE orders ADD COLUMN restocked INTEGER",
        "ALTER TABLE teams ADD COLUMN seats TEXT",
        """CREATE TABLE IF NOT EXISTS sequences (
            campaign_id TEXT PRIMARY KEY,
            order_seq   BIGINT NOT NULL,
            team_seq    BIGINT NOT NULL
        )""",
    ),
    (
        # Campaigns archived out of Redis (engine.archive): SQL is then their only copy; what
        # their reads need that lived only in Redis is kept here (JSON objects).
        """CREATE TABLE IF NOT EXISTS archives (
            campaign_id TEXT PRIMARY KEY,
            archived_at BIGINT NOT NULL,
            sold_out    TEXT NOT NULL,
            rejections  TEXT NOT NULL
        )""",
    ),
    (
        # A sharded flash campaign's stock buckets (engine/shards.py): their numbers, "0,3,7";
        # NULL for one bucket. Fixed at creation, so every process derives the same keys.
        "ALTER TABLE campaigns ADD COLUMN shards TEXT",
    ),
    (
        # Team deal options (docs/lifecycle.md#campaign): a cap on the units of one order, and
        # for team campaigns the paid seats that make an expiring team succeed; NULL: off.
        # (A leader price is an item's, kept in the items' JSON.)
        "ALTER TABLE campaigns ADD COLUMN per_order_limit INTEGER",
        "ALTER TABLE campaigns ADD COLUMN auto_success_min_paid INTEGER",
    ),
    (
        # Team campaigns: the time to pay a team must leave to be offered by quick-join and
        # the joinable list (docs/lifecycle.md#team-deal-options); NULL: the default.
        "ALTER TABLE campaigns ADD COLUMN min_pay_seconds INTEGER",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

CAMPAIGN_COLUMNS = (
    "id",
    "kind",
    "title",
    "starts_at",
    "ends_at",
    "per_user_limit",
    "hold_seconds",
    "team_size",
    "team_ttl_seconds",
    "invalidated_at",
    "items",
    "shards",  # the stock buckets' numbers, "0,3,7"; NULL for one bucket
    "per_order_limit",  # units per order at most; NULL: only the per-user limit
    "auto_success_min_paid",  # team campaigns: paid seats an expiring team succeeds with
    "min_pay_seconds",  # team campaigns: time to pay a team must leave to be offered
)
ORDER_COLUMNS = (
    "order_id",
    "campaign_id",
    "user_id",
    "sku",
    "qty",
    "amount",
    "state",
    "order_type",
    "team_id",
    "payment_ref",
    "created_at",
    "expires_at",
    "updated_at",
    "version",
    "idem",  # "<op><user>:<key>": the idempotency record of the creating request, or NULL
    "restocked",  # a refunded order: 1 when its units went back on sale, else 0; NULL otherwise
)
TEAM_COLUMNS = (
    "team_id",
    "campaign_id",
    "leader_id",
    "sku",
    "qty",
    "size",
    "state",
    "why",
    "held",
    "paid",
    "created_at",
    "opened_at",
    "expires_at",
    "updated_at",
    "version",
    "seats",  # the seats taken, leader first: "<order id>=<user>,..." (lua/lib/team.lua)
)
# Two rows with one id are the same order (or team) only when these agree; a write that
# would overwrite a different one is a collision (an id issued twice by a Redis that lost
# state), never applied.
IDENTITY = {"orders": ("user_id", "created_at"), "teams": ("leader_id", "created_at")}
IDENTITY_KEY = {"orders": "order_id", "teams": "team_id"}
# Columns a later version leaves as they are when it does not carry them.
KEPT = frozenset({"idem"})

Placeholder = Callable[[int], str]


def qmark(_: int) -> str:
    """SQLite's placeholder."""
    return "?"


def dollar(n: int) -> str:
    """PostgreSQL's (asyncpg) placeholder."""
    return f"${n}"


def insert(table: str, columns: tuple[str, ...], mark: Placeholder) -> str:
    """A plain INSERT of every column."""
    values = ", ".join(mark(i + 1) for i in range(len(columns)))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"


def upsert_newer(
    table: str, columns: tuple[str, ...], mark: Placeholder, *, rows: str | None = None
) -> str:
    """INSERT, or UPDATE the existing row when the new row's version is higher and it is the
    same order or team (``IDENTITY``): a colliding row is left alone.

    A ``KEPT`` column (the idempotency record, carried only by an order's first event) is
    filled from any version while it is empty: a payment committed to SQL ahead of the
    outbox (engine.orders.PaymentLedger) is newer than the order.reserved event that brings
    it. One row of ``mark`` placeholders, or ``rows``: a query giving many (PostgreSQL's
    unnest).
    """
    key = columns[0]
    newer = f"excluded.version > {table}.version"
    kept = [c for c in columns[1:] if c in KEPT]
    if kept:
        assignments = ", ".join(
            f"{c} = COALESCE({table}.{c}, excluded.{c})"
            if c in KEPT
            else f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {table}.{c} END"
            for c in columns[1:]
        )
        fills = " OR ".join(f"({table}.{c} IS NULL AND excluded.{c} IS NOT NULL)" for c in kept)
        when = f"({newer} OR {fills})"
    else:
        assignments = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
        when = newer
    same = "".join(f" AND {table}.{c} = excluded.{c}" for c in IDENTITY.get(table, ()))
    head = (
        insert(table, columns, mark)
        if rows is None
        else (f"INSERT INTO {table} ({', '.join(columns)}) {rows}")
    )
    return f"{head} ON CONFLICT ({key}) DO UPDATE SET {assignments} WHERE {when}{same}"


def raise_marks(mark: Placeholder, greatest: str) -> str:
    """Move a campaign's durable high-water marks up (never down); ``greatest`` is the
    backend's two-argument maximum (SQLite MAX, PostgreSQL GREATEST)."""
    return (
        "INSERT INTO sequences (campaign_id, order_seq, team_seq)"
        f" VALUES ({mark(1)}, {mark(2)}, {mark(3)}) ON CONFLICT (campaign_id) DO UPDATE SET"
        f" order_seq = {greatest}(sequences.order_seq, excluded.order_seq),"
        f" team_seq = {greatest}(sequences.team_seq, excluded.team_seq)"
    )


def identities(table: str, mark: Placeholder, count: int) -> str:
    """The identity columns of up to ``count`` rows of ``table`` by id (collision checks)."""
    key = IDENTITY_KEY[table]
    columns = ", ".join((key, *IDENTITY[table]))
    marks = ", ".join(mark(i + 1) for i in range(count))
    return f"SELECT {columns} FROM {table} WHERE {key} IN ({marks})"


def replace_campaign(mark: Placeholder) -> str:
    """INSERT a campaign, or overwrite every field of the existing one."""
    assignments = ", ".join(f"{c} = excluded.{c}" for c in CAMPAIGN_COLUMNS[1:])
    return (
        f"{insert('campaigns', CAMPAIGN_COLUMNS, mark)} ON CONFLICT (id) DO UPDATE SET"
        f" {assignments}"
    )


INVALIDATE = "UPDATE campaigns SET invalidated_at = COALESCE(invalidated_at, {0}) WHERE id = {1}"
USER_ORDERS = (
    f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders WHERE user_id = {{0}}"
    " ORDER BY created_at DESC, order_id DESC LIMIT {1}"
)
TEAM_ORDERS = (
    f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders WHERE team_id = {{0}}"
    " ORDER BY created_at, order_id"
)
GET_ORDER = f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders WHERE order_id = {{0}}"
ORDER_TOTALS = (
    "SELECT sku, state, COUNT(*) AS orders, SUM(qty) AS units, SUM(amount) AS amount,"
    " SUM(CASE WHEN restocked = 0 THEN qty ELSE 0 END) AS kept"
    " FROM orders WHERE campaign_id = {0} GROUP BY sku, state"
)
# Teams that opened; the mean time to fill of those that filled every seat; those that
# succeeded automatically at expiry (why 'auto'), and the seats they lacked.
TEAM_FILL = (
    "SELECT COUNT(opened_at) AS opened,"
    " AVG(CASE WHEN state = 'succeeded' AND COALESCE(why, '') <> 'auto'"
    " THEN updated_at - opened_at END) AS fill_ms,"
    " SUM(CASE WHEN state = 'succeeded' AND why = 'auto' THEN 1 ELSE 0 END) AS auto,"
    " SUM(CASE WHEN state = 'succeeded' AND why = 'auto' THEN size - paid ELSE 0 END)"
    " AS unfilled"
    " FROM teams WHERE campaign_id = {0}"
)
TEAM_TOTALS = "SELECT state, COUNT(*) AS teams FROM teams WHERE campaign_id = {0} GROUP BY state"
CAMPAIGN_ORDERS = (
    f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders WHERE campaign_id = {{0}} ORDER BY order_id"
)
CAMPAIGN_TEAMS = (
    f"SELECT {', '.join(TEAM_COLUMNS)} FROM teams WHERE campaign_id = {{0}} ORDER BY team_id"
)


def insert_archive(mark: Placeholder) -> str:
    """Record a campaign as archived; a second write of the same campaign changes nothing."""
    return f"{insert('archives', ARCHIVE_COLUMNS, mark)} ON CONFLICT (campaign_id) DO NOTHING"


MARKS = "SELECT order_seq, team_seq FROM sequences WHERE campaign_id = {0}"
# The versions of the campaign's orders and teams changed at or after {1} (and {3}): what a
# verification of a new Redis server compares with what the server holds (engine.recovery).
RECENT_VERSIONS = (
    "SELECT order_id AS id, version FROM orders WHERE campaign_id = {0} AND updated_at >= {1}"
    " UNION ALL"
    " SELECT team_id AS id, version FROM teams WHERE campaign_id = {2} AND updated_at >= {3}"
)
GET_CAMPAIGN = f"SELECT {', '.join(CAMPAIGN_COLUMNS)} FROM campaigns WHERE id = {{0}}"
CAMPAIGNS_ENDING_AFTER = (
    f"SELECT {', '.join(CAMPAIGN_COLUMNS)} FROM campaigns WHERE ends_at > {{0}}"
    " AND id NOT IN (SELECT campaign_id FROM archives) ORDER BY starts_at"
)
ARCHIVE_COLUMNS = ("campaign_id", "archived_at", "sold_out", "rejections")
GET_ARCHIVE = f"SELECT {', '.join(ARCHIVE_COLUMNS)} FROM archives WHERE campaign_id = {{0}}"
# Campaigns over (ended or invalidated) before {0} whose orders and teams last changed before
# {1} and {2} (the same moment), not archived yet: the archiver's candidates, oldest end first.
ARCHIVE_CANDIDATES = (
    "SELECT c.id FROM campaigns c WHERE"
    " CASE WHEN c.invalidated_at IS NOT NULL AND c.invalidated_at < c.ends_at"
    " THEN c.invalidated_at ELSE c.ends_at END < {0}"
    " AND c.id NOT IN (SELECT campaign_id FROM archives)"
    " AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.campaign_id = c.id AND o.updated_at >= {1})"
    " AND NOT EXISTS (SELECT 1 FROM teams t WHERE t.campaign_id = c.id AND t.updated_at >= {2})"
    " ORDER BY c.ends_at"
)
GET_TEAM = f"SELECT {', '.join(TEAM_COLUMNS)} FROM teams WHERE team_id = {{0}}"


def query(template: str, mark: Placeholder) -> str:
    """Fill a ``{0}``, ``{1}``... template with the backend's placeholders."""
    return template.format(*(mark(i + 1) for i in range(template.count("{"))))
