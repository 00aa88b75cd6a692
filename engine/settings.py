"""One frozen settings object, built from ``FLASHTEAM_*`` environment variables.

Each field of ``Settings`` is one variable, ``FLASHTEAM_<FIELD NAME IN CAPITALS>``; its
default and its meaning are written once, in the field, and everything else derives from
there: ``from_env`` reads them, ``to_env`` hands them to a child process, and
``Settings.describe()`` is the table ``flashteam --help`` prints. Booleans are ``1``/``0``
(also true/false, yes/no, on/off); an empty variable counts as unset.

``API_HOST``, ``API_PORT`` and ``API_WORKERS`` are the defaults of the ``--host``, ``--port``
and ``--workers`` options of ``flashteam run`` and ``flashteam serve``.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from engine.errors import ConfigurationError

API_HOST = "127.0.0.1"
API_PORT = 8000
API_WORKERS = 2

_PREFIX = "FLASHTEAM_"
_FLAGS = {"1": True, "true": True, "yes": True, "on": True} | {
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
MIN_TOKEN_LENGTH = 32
_MIN_IDEMPOTENCY_TTL = 86_400  # a client retrying within a day is answered, not re-run

_T = TypeVar("_T")


def _setting(default: _T, meaning: str, *, secret: bool = False) -> _T:
    """A field with its default and the one-line meaning ``describe`` prints; a ``secret``
    one (a token, a password, a URL that may carry one) is left out of the settings' repr,
    so no log line or traceback that shows them shows it."""
    made: _T = field(default=default, metadata={"meaning": meaning}, repr=not secret)
    return made


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, with production-safe defaults."""

    redis_url: str | None = _setting(
        None,
        "Redis to use; unset (and no FLASHTEAM_REDIS_SENTINELS): `flashteam run` starts a "
        "private redis-server under the data dir",
        secret=True,
    )
    redis_cluster: bool = _setting(
        False,
        "1: the Redis URL names a node of a Redis Cluster, or several (seeds: a comma-separated "
        "list of URLs, tried in turn until one answers; the first URL's password and options "
        "apply to all)",
    )
    redis_sentinels: str | None = _setting(
        None,
        "Redis Sentinel addresses, host:port,host:port,...: the engine asks them where the "
        "primary of FLASHTEAM_REDIS_MASTER is and follows a failover; FLASHTEAM_REDIS_URL must "
        "then be unset; not with FLASHTEAM_REDIS_CLUSTER (a cluster fails over by itself); "
        "unset: no Sentinel",
    )
    redis_master: str = _setting(
        "flashteam", "the master name the Sentinels monitor (with FLASHTEAM_REDIS_SENTINELS)"
    )
    redis_username: str | None = _setting(
        None,
        "with FLASHTEAM_REDIS_SENTINELS: the ACL user the engine logs in as on the primary "
        "(docs/operations.md#redis-acl); with a URL, put it in the URL",
    )
    redis_password: str | None = _setting(
        None,
        "with FLASHTEAM_REDIS_SENTINELS: the password of the primary and its replicas (their "
        "requirepass, or the ACL user's); with a URL, put it in the URL",
        secret=True,
    )
    redis_sentinel_password: str | None = _setting(
        None,
        "with FLASHTEAM_REDIS_SENTINELS: the Sentinels' own password (their requirepass)",
        secret=True,
    )
    redis_tls: bool = _setting(
        False,
        "with FLASHTEAM_REDIS_SENTINELS, 1: TLS to the Sentinels and to the primary and "
        "replicas they name; with FLASHTEAM_REDIS_URL, write rediss:// for TLS instead",
    )
    redis_tls_ca: str | None = _setting(
        None,
        "a PEM file of the CA certificates that Redis's TLS certificates (and the Sentinels') "
        "must chain to, for a rediss:// URL or FLASHTEAM_REDIS_TLS=1; the certificate must also "
        "name the host connected to; unset: the CAs the system trusts",
    )
    redis_tls_cert: str | None = _setting(
        None,
        "a PEM file of the engine's own TLS client certificate, for a Redis that asks for one "
        "(tls-auth-clients yes, Redis's default); its key in it or in FLASHTEAM_REDIS_TLS_KEY",
    )
    redis_tls_key: str | None = _setting(
        None, "the PEM file of the private key of FLASHTEAM_REDIS_TLS_CERT, when not in it"
    )
    database_url: str | None = _setting(
        None,
        "the durable store: sqlite:///path or postgresql://user:password@host:port/database; "
        "unset: SQLite, flashteam.db in the data dir",
        secret=True,
    )
    data_dir: Path = _setting(  # noqa: RUF009 (a Path is immutable, safe to share)
        Path("var"), "where local data lives: the private Redis's AOF, SQLite"
    )
    appendfsync: str = _setting(
        "everysec",
        "the private Redis's AOF fsync: everysec (up to ~1 s of acknowledged writes lost on "
        "power loss) or always (zero loss)",
    )
    rate_limit: int = _setting(5, "order attempts per user per campaign per second; 0 = off")
    idempotency_ttl: int = _setting(
        _MIN_IDEMPOTENCY_TTL,
        f"seconds an idempotency key is remembered, at least {_MIN_IDEMPOTENCY_TTL} (24 h)",
    )
    reaper_interval: float = _setting(0.2, "seconds between reaper passes, at most 1")
    reaper_batch: int = _setting(500, "held orders ended per script call")
    flush_batch: int = _setting(
        1000,
        "outbox entries the flush worker reads per stream and step (up to 4 times as many "
        "while the stream holds more)",
    )
    claim_idle: float = _setting(
        30.0,
        "seconds an entry may sit unacknowledged with a consumer before another worker claims "
        "it (XAUTOCLAIM)",
    )
    worker_name: str | None = _setting(
        None,
        "this worker's consumer name, stable across its restarts so a restarted worker resumes "
        "its own pending entries at once (`flashteam run` sets <hostname>-<port>-worker); "
        "unset: <hostname>-<pid>",
    )
    restart_limit: int = _setting(
        5,
        "`flashteam run` restarts a process that exits, but one that exits more than this many "
        "times within FLASHTEAM_RESTART_WINDOW stops the engine (a crash loop)",
    )
    restart_window: float = _setting(
        60.0, "seconds over which `flashteam run` counts each process's exits (the restart limit)"
    )
    gateway_token: str | None = _setting(
        None,
        "bearer token of the storefront gateway (HTTP API), or several separated by commas "
        "(the current and the next one, during a rotation); each 32+ characters, not one "
        "character repeated; `flashteam run` generates one when unset",
        secret=True,
    )
    admin_token: str | None = _setting(
        None,
        "bearer token for campaign management and refunds, or several separated by commas "
        "(as FLASHTEAM_GATEWAY_TOKEN); `flashteam run` generates one when unset",
        secret=True,
    )
    max_body: int = _setting(65_536, "largest HTTP request body accepted, bytes; 1024 to 16777216")
    max_head: int = _setting(
        16_384,
        "largest HTTP request head (request line and headers), bytes, 1024 to 1048576: a larger "
        "one answers 431 and the connection closes",
    )
    max_headers: int = _setting(
        100, "most headers in one HTTP request, 8 to 1000: more answer 431 and close"
    )
    max_url: int = _setting(
        8_192,
        "longest HTTP request target (path and query), bytes, 256 to max_head: longer answers "
        "414 and closes",
    )
    header_timeout: float = _setting(
        10.0,
        "seconds a client has to send a whole request head once it started it: 408 and close "
        "after that",
    )
    body_timeout: float = _setting(
        10.0,
        "seconds a client has to send a whole request body once its head arrived: 408 and "
        "close after that",
    )
    keep_alive: float = _setting(
        5.0, "seconds an idle keep-alive connection (or one that sent nothing yet) stays open"
    )
    write_timeout: float = _setting(
        10.0,
        "seconds a client that stopped reading its answers has to take them again before its "
        "connection is dropped",
    )
    max_connections: int = _setting(
        4_096,
        "open connections per API worker (its open-file limit is raised to fit): a new one "
        "over it takes the place of the connection idle the longest, or answers 503 overloaded "
        "and closes when none is idle",
    )
    request_timeout: float = _setting(
        2.0,
        "seconds a request may wait on Redis or SQL: then it answers 503 unavailable with "
        "Retry-After (retry with the same idempotency key or payment reference), 0.1 to 30",
    )
    admission_target: float = _setting(
        0.05,
        "seconds an admitted request should take at most: each API worker adapts how many "
        "requests it runs at once so they stay under it, and answers the excess 503 overloaded "
        "at once",
    )
    admission_min: int = _setting(
        64,
        "the fewest requests an API worker runs at once, however slow they are (at least 1; "
        "the default is one coalesced batch: fewer would cost throughput, not latency)",
    )
    admission_max: int = _setting(
        1_024, "the most requests an API worker runs at once, however fast they are"
    )
    echo_route: bool = _setting(
        False,
        "1: also serve POST /bench/echo, a bare JSON echo (the baseline of benchmark T2, "
        "docs/performance.md)",
    )
    coalesce: bool = _setting(
        True,
        "1: concurrent reserve/join/quick-join calls of one campaign share one script call; "
        "0: one call each",
    )
    coalesce_batch: int = _setting(
        64,
        "most requests in one coalesced call, 1 to 512 (a larger burst goes out as several "
        "calls, so Redis runs one while this process prepares the next)",
    )
    coalesce_window_us: int = _setting(
        0,
        "microseconds a batch waits for company, at most 1000; 0: the current turn of the "
        "event loop, no timer",
    )
    sold_out_ttl: float = _setting(
        0.5,
        "seconds a process sends reservations of a sold-out item as probes (a replay, sold_out "
        "while no unit is left, the reservation once one is back); 0 = off; at most 1",
    )
    archive_after: float = _setting(
        3600.0,
        "seconds a finished campaign stays in Redis after its end and its last change before "
        "it is archived to SQL and its keys leave Redis (docs/lifecycle.md)",
    )
    archive_interval: float = _setting(
        60.0, "seconds between the reaper's archival passes; 0 = no automatic archival"
    )
    pay_durability: str = _setting(
        "sql",
        "when a payment is acknowledged: 'sql' once the paid order is committed to the durable "
        "store (survives the loss of Redis data), 'outbox' once Redis has it (faster; a Redis "
        "failover can lose the last payments, docs/faults.md)",
    )
    pay_wait: float = _setting(
        5.0,
        "seconds a payment waits at most for SQL to confirm it (with 'sql' durability), retrying "
        "meanwhile; then 503 payment_pending: not declined, retry with the same payment_ref",
    )

    def __post_init__(self) -> None:
        self._check_redis()
        if self.appendfsync not in ("everysec", "always"):
            raise ConfigurationError("FLASHTEAM_APPENDFSYNC must be 'everysec' or 'always'")
        if self.rate_limit < 0:
            raise ConfigurationError("FLASHTEAM_RATE_LIMIT must be >= 0 (0 turns it off)")
        if self.idempotency_ttl < _MIN_IDEMPOTENCY_TTL:
            raise ConfigurationError(
                f"FLASHTEAM_IDEMPOTENCY_TTL must be >= {_MIN_IDEMPOTENCY_TTL} (24 h)"
            )
        if self.flush_batch < 1 or self.claim_idle <= 0:
            raise ConfigurationError(
                "FLASHTEAM_FLUSH_BATCH must be >= 1 and FLASHTEAM_CLAIM_IDLE > 0 seconds"
            )
        if not 1 <= self.coalesce_batch <= 512 or not 0 <= self.coalesce_window_us <= 1000:
            raise ConfigurationError(
                "FLASHTEAM_COALESCE_BATCH must be from 1 to 512 and "
                "FLASHTEAM_COALESCE_WINDOW_US from 0 to 1000"
            )
        if self.pay_durability not in ("sql", "outbox"):
            raise ConfigurationError("FLASHTEAM_PAY_DURABILITY must be 'sql' or 'outbox'")
        if not 0 <= self.sold_out_ttl <= 1:
            raise ConfigurationError("FLASHTEAM_SOLD_OUT_TTL must be from 0 to 1 seconds")
        if not 1_024 <= self.max_body <= 16_777_216:
            raise ConfigurationError("FLASHTEAM_MAX_BODY must be from 1024 to 16777216 bytes")
        self._check_reaper()
        self._check_http()
        self._check_recovery()

    def _check_recovery(self) -> None:
        """How long a payment waits for SQL; how `flashteam run` restarts its processes."""
        if not 0.1 <= self.pay_wait <= 60:
            raise ConfigurationError("FLASHTEAM_PAY_WAIT must be from 0.1 to 60 seconds")
        if self.restart_limit < 1 or self.restart_window <= 0:
            raise ConfigurationError(
                "FLASHTEAM_RESTART_LIMIT must be >= 1 and FLASHTEAM_RESTART_WINDOW > 0 seconds"
            )

    def _check_reaper(self) -> None:
        if not 0 < self.reaper_interval <= 1 or self.reaper_batch < 1:
            raise ConfigurationError(
                "FLASHTEAM_REAPER_INTERVAL must be in (0, 1] seconds (holds expire within 1 s)"
                " and FLASHTEAM_REAPER_BATCH >= 1"
            )
        if self.archive_after < 0 or self.archive_interval < 0:
            raise ConfigurationError(
                "FLASHTEAM_ARCHIVE_AFTER and FLASHTEAM_ARCHIVE_INTERVAL must be >= 0 seconds"
            )

    def _check_http(self) -> None:
        if not 1_024 <= self.max_head <= 1_048_576 or not 8 <= self.max_headers <= 1_000:
            raise ConfigurationError(
                "FLASHTEAM_MAX_HEAD must be from 1024 to 1048576 bytes and FLASHTEAM_MAX_HEADERS "
                "from 8 to 1000"
            )
        if not 256 <= self.max_url <= self.max_head:
            raise ConfigurationError(
                "FLASHTEAM_MAX_URL must be from 256 bytes to FLASHTEAM_MAX_HEAD"
            )
        timeouts = (self.header_timeout, self.body_timeout, self.keep_alive, self.write_timeout)
        if not all(0 < each <= 3_600 for each in timeouts):
            raise ConfigurationError(
                "FLASHTEAM_HEADER_TIMEOUT, FLASHTEAM_BODY_TIMEOUT, FLASHTEAM_KEEP_ALIVE and "
                "FLASHTEAM_WRITE_TIMEOUT must be in (0, 3600] seconds"
            )
        if not 0.1 <= self.request_timeout <= 30:
            raise ConfigurationError("FLASHTEAM_REQUEST_TIMEOUT must be from 0.1 to 30 seconds")
        if self.max_connections < 16:
            raise ConfigurationError("FLASHTEAM_MAX_CONNECTIONS must be >= 16")
        if not 0 < self.admission_target <= 10 or not (
            1 <= self.admission_min <= self.admission_max
        ):
            raise ConfigurationError(
                "FLASHTEAM_ADMISSION_TARGET must be in (0, 10] seconds and "
                "1 <= FLASHTEAM_ADMISSION_MIN <= FLASHTEAM_ADMISSION_MAX"
            )

    def _check_redis(self) -> None:
        """How the engine finds Redis: one URL, or the Sentinels (never both, never Sentinel
        with Cluster)."""
        self._check_redis_tls()
        if self.redis_url is not None and "," in self.redis_url and not self.redis_cluster:
            raise ConfigurationError(
                f"{_PREFIX}REDIS_URL lists several URLs, which only a Redis Cluster takes (its "
                f"seeds): set {_PREFIX}REDIS_CLUSTER=1, or name one server"
            )
        sentinels = f"{_PREFIX}REDIS_SENTINELS"
        if self.redis_sentinels is None:
            if self.redis_username or self.redis_password or self.redis_sentinel_password:
                raise ConfigurationError(
                    f"{_PREFIX}REDIS_USERNAME, {_PREFIX}REDIS_PASSWORD and "
                    f"{_PREFIX}REDIS_SENTINEL_PASSWORD go with {sentinels}; with "
                    f"{_PREFIX}REDIS_URL, put the user and password in the URL "
                    "(redis://user:password@host:port/0)"
                )
            return
        if self.redis_url is not None:
            raise ConfigurationError(
                f"{_PREFIX}REDIS_URL and {sentinels} are both set: with Sentinel the engine "
                f"asks the Sentinels where the primary is; unset {_PREFIX}REDIS_URL"
            )
        if self.redis_cluster:
            raise ConfigurationError(
                f"{sentinels} and {_PREFIX}REDIS_CLUSTER=1 do not go together: a Redis Cluster "
                "fails over by itself (its replicas), Sentinel is for one primary with replicas"
            )
        if not self.redis_master or any(c.isspace() for c in self.redis_master):
            raise ConfigurationError(
                f"{_PREFIX}REDIS_MASTER must be the master name the Sentinels of {sentinels} "
                f"monitor (no spaces), not {self.redis_master!r}"
            )
        _addresses(self.redis_sentinels)  # a bad list fails here, at start-up

    def _check_redis_tls(self) -> None:
        """TLS is asked for one way per mode (rediss:// in a URL, FLASHTEAM_REDIS_TLS=1 with
        Sentinels); certificate files without TLS would be ignored, so they are refused."""
        if self.redis_tls and self.redis_sentinels is None:
            raise ConfigurationError(
                f"{_PREFIX}REDIS_TLS=1 goes with {_PREFIX}REDIS_SENTINELS; with "
                f"{_PREFIX}REDIS_URL, write rediss:// instead of redis:// for TLS"
            )
        files = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        if any(each is not None for each in files) and not self.redis_tls_enabled:
            raise ConfigurationError(
                f"{_PREFIX}REDIS_TLS_CA, {_PREFIX}REDIS_TLS_CERT and {_PREFIX}REDIS_TLS_KEY are "
                f"for TLS to Redis, which is off: use a rediss:// URL, or {_PREFIX}REDIS_TLS=1 "
                "with Sentinels"
            )
        if self.redis_tls_key is not None and self.redis_tls_cert is None:
            raise ConfigurationError(
                f"{_PREFIX}REDIS_TLS_KEY is the key of {_PREFIX}REDIS_TLS_CERT, which is unset"
            )

    @property
    def redis_tls_enabled(self) -> bool:
        """Whether the engine talks to Redis over TLS: a rediss:// URL (the first, for a
        Cluster's seeds) or FLASHTEAM_REDIS_TLS=1 with Sentinels."""
        if self.redis_sentinels is not None:
            return self.redis_tls
        return self.redis_url is not None and self.redis_url.strip().lower().startswith("rediss://")

    @property
    def redis_name(self) -> str:
        """Where the engine finds Redis, for logs and `flashteam run`'s banner: the URL (its
        password masked), or the Sentinels and the master name; "(unset)" before `flashteam
        run` starts its own."""
        if self.redis_sentinels is not None:
            tls = " (TLS)" if self.redis_tls else ""
            return f"Sentinel master {self.redis_master!r} via {self.redis_sentinels}{tls}"
        if self.redis_url is None:
            return "(unset)"
        return redact(self.redis_url) + (" (Redis Cluster)" if self.redis_cluster else "")

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``FLASHTEAM_REDIS_SENTINELS`` as (host, port) pairs, in the order given; empty when
        unset."""
        return [] if self.redis_sentinels is None else _addresses(self.redis_sentinels)

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file: from ``sqlite:///...`` or the default under the data dir."""
        url = self.database_url
        if url is None:
            return self.data_dir / "flashteam.db"
        if not url.startswith("sqlite:///"):
            raise ConfigurationError(f"not a SQLite URL: {url.split('://')[0]}://...")
        return Path(url.removeprefix("sqlite:///"))

    def require_tokens(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The gateway tokens and the admin tokens (each role may have several: the current
        and the next during a rotation); ConfigurationError when a role has none, when one
        is weak (under MIN_TOKEN_LENGTH characters, or one character repeated), or when both
        roles share one. The message never quotes a token."""
        roles = []
        for name, value in (
            ("GATEWAY_TOKEN", self.gateway_token),
            ("ADMIN_TOKEN", self.admin_token),
        ):
            tokens = tuple(t.strip() for t in (value or "").split(","))
            if not value or any(
                len(token) < MIN_TOKEN_LENGTH or len(set(token)) == 1 for token in tokens
            ):
                raise ConfigurationError(
                    f"{_PREFIX}{name} must be set to one or more secrets (separated by "
                    f"commas) of {MIN_TOKEN_LENGTH} or more characters, not one character "
                    "repeated: `python -c 'import secrets; print(secrets.token_urlsafe(32))'` "
                    "makes one (`flashteam run` generates both when unset)"
                )
            roles.append(tokens)
        if set(roles[0]) & set(roles[1]):
            raise ConfigurationError("the gateway and admin tokens must differ")
        return roles[0], roles[1]

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests, CLI flags)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The ``FLASHTEAM_*`` variables that ``from_env`` turns back into these settings
        (unset fields left out): how the launcher hands its configuration to a child."""
        return {
            _variable(each): _text(value)
            for each in fields(self)
            if (value := getattr(self, each.name)) is not None
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``FLASHTEAM_*`` variable; ConfigurationError names a bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for each in fields(cls):
            raw = env.get(_variable(each))
            if raw:
                values[each.name] = _READERS[each.name](_variable(each), raw)
        return cls(**values)

    @classmethod
    def describe(cls) -> list[str]:
        """One entry per variable, wrapped to 100 columns: its name, meaning and default
        (the table ``flashteam --help`` prints)."""
        width = max(len(_variable(each)) for each in fields(cls))
        return [
            textwrap.fill(
                f"{_variable(each):<{width}}  {each.metadata['meaning']}"
                + ("" if each.default is None else f" (default {_text(each.default)})"),
                width=100,
                subsequent_indent=" " * (width + 2),
            )
            for each in fields(cls)
        ]


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: how every URL is logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _variable(each: Field[Any]) -> str:
    return _PREFIX + each.name.upper()


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _addresses(raw: str) -> list[tuple[str, int]]:
    """``host:port,host:port,...`` as pairs (``[::1]:26379`` is an IPv6 address);
    ConfigurationError names a bad or repeated entry."""
    name = f"{_PREFIX}REDIS_SENTINELS"
    addresses: list[tuple[str, int]] = []
    for entry in (each.strip() for each in raw.split(",")):
        host, colon, port = entry.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536) or any(
            c.isspace() or c in "/[]" for c in host
        ):
            raise ConfigurationError(
                f"{name} must be a comma-separated list of host:port (a port from 1 to 65535), "
                f"like 10.0.0.1:26379,10.0.0.2:26379; not {entry!r}"
            )
        if (host, int(port)) in addresses:
            raise ConfigurationError(f"{name} names {entry} twice")
        addresses.append((host, int(port)))
    return addresses


def _flag(name: str, raw: str) -> bool:
    if raw.lower() not in _FLAGS:
        raise ConfigurationError(f"{name} must be 1/0, true/false, yes/no, on/off")
    return _FLAGS[raw.lower()]


def _number(kind: type[int] | type[float]) -> Callable[[str, str], float]:
    def read(name: str, raw: str) -> float:
        try:
            return kind(raw)
        except ValueError as exc:
            raise ConfigurationError(f"{name} must be a number, not {raw!r}") from exc

    return read


_BY_TYPE: dict[str, Callable[[str, str], object]] = {
    "bool": _flag,
    "int": _number(int),
    "float": _number(float),
    "Path": lambda _, raw: Path(raw),
    "str": lambda _, raw: raw,
    "str | None": lambda _, raw: raw,
}
# A field of a type without a reader fails here, at import, not when its variable is first set.
_READERS = {each.name: _BY_TYPE[str(each.type)] for each in fields(Settings)}

#: Every setting at its default: for options and helpers that mirror a setting.
DEFAULTS = Settings()
