"""One frozen settings object, built from ``FLASHTEAM_*`` environment variables.

FLASHTEAM_REDIS_URL        Redis to use. Unset: ``flashteam run`` starts a private redis-server
                           under FLASHTEAM_DATA_DIR.
FLASHTEAM_REDIS_CLUSTER    ``1``: the URL names a node of a Redis Cluster (default 0).
FLASHTEAM_DATABASE_URL     the durable store: ``sqlite:///path`` (default
                           ``sqlite:///<data dir>/flashteam.db``) or
                           ``postgresql://user:password@host:port/database``.
FLASHTEAM_DATA_DIR         where local data lives: Redis AOF, SQLite (default ``./var``).
FLASHTEAM_APPENDFSYNC      the private Redis's AOF fsync: ``everysec`` (default; up to ~1 s of
                           acknowledged writes lost on power loss) or ``always`` (zero loss).
FLASHTEAM_RATE_LIMIT       order attempts per user per campaign per second (default 5, 0 = off).
FLASHTEAM_IDEMPOTENCY_TTL  seconds an idempotency key is remembered (default and minimum 86400).
FLASHTEAM_REAPER_INTERVAL  seconds between reaper passes, at most 1 (default 0.2).
FLASHTEAM_REAPER_BATCH     held orders ended per script call (default 500).
FLASHTEAM_FLUSH_BATCH      outbox entries the flush worker reads per stream and step
                           (default 1000).
FLASHTEAM_CLAIM_IDLE       seconds an entry may sit unacknowledged with a consumer before
                           another worker claims it (XAUTOCLAIM; default 30).
FLASHTEAM_WORKER_NAME      this worker's consumer name (default <hostname>-<pid>).
FLASHTEAM_GATEWAY_TOKEN    bearer token of the storefront gateway (HTTP API; 16+ characters).
FLASHTEAM_ADMIN_TOKEN      bearer token for campaign management and refunds (16+ characters).
FLASHTEAM_MAX_BODY         largest HTTP request body accepted, bytes (default 65536).
FLASHTEAM_COALESCE         ``1`` (default): concurrent reserve/join/quick-join calls of one
                           campaign share one script call; ``0``: one call each.
FLASHTEAM_COALESCE_BATCH   most requests in one coalesced call (default 64: a burst of
                           100 callers goes out as two calls, so Redis runs one while this
                           process prepares the next).
FLASHTEAM_COALESCE_WINDOW_US  microseconds a batch waits for company (default 0: the current
                           turn of the event loop, no timer; at most 1000).
FLASHTEAM_SOLD_OUT_TTL     seconds a sold-out item is answered without running a reservation
                           (default 0.5; 0 = off; at most 1: returned units sell within 1 s).
FLASHTEAM_ECHO_ROUTE       ``1``: also serve ``POST /bench/echo``, a bare JSON echo (the T2
                           benchmark's baseline; off by default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from engine.errors import ConfigurationError

_PREFIX = "FLASHTEAM_"
_FLAGS = {"1": True, "true": True, "yes": True, "on": True} | {
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, with production-safe defaults."""

    redis_url: str | None = None
    redis_cluster: bool = False
    database_url: str | None = None
    data_dir: Path = Path("var")
    appendfsync: str = "everysec"
    rate_limit: int = 5
    idempotency_ttl: int = 86_400
    reaper_interval: float = 0.2
    reaper_batch: int = 500
    flush_batch: int = 1000
    claim_idle: float = 30.0
    worker_name: str | None = None
    gateway_token: str | None = None
    admin_token: str | None = None
    max_body: int = 65_536
    echo_route: bool = False
    coalesce: bool = True
    coalesce_batch: int = 64
    coalesce_window_us: int = 0
    sold_out_ttl: float = 0.5

    def __post_init__(self) -> None:
        if self.appendfsync not in ("everysec", "always"):
            raise ConfigurationError("FLASHTEAM_APPENDFSYNC must be 'everysec' or 'always'")
        if self.rate_limit < 0:
            raise ConfigurationError("FLASHTEAM_RATE_LIMIT must be >= 0 (0 turns it off)")
        if self.idempotency_ttl < 86_400:
            raise ConfigurationError("FLASHTEAM_IDEMPOTENCY_TTL must be >= 86400 (24 h)")
        if self.flush_batch < 1 or self.claim_idle <= 0:
            raise ConfigurationError(
                "FLASHTEAM_FLUSH_BATCH must be >= 1 and FLASHTEAM_CLAIM_IDLE > 0 seconds"
            )
        if not 1 <= self.coalesce_batch <= 512 or not 0 <= self.coalesce_window_us <= 1000:
            raise ConfigurationError(
                "FLASHTEAM_COALESCE_BATCH must be from 1 to 512 and "
                "FLASHTEAM_COALESCE_WINDOW_US from 0 to 1000"
            )
        if not 0 <= self.sold_out_ttl <= 1:
            raise ConfigurationError("FLASHTEAM_SOLD_OUT_TTL must be from 0 to 1 seconds")
        if not 1_024 <= self.max_body <= 16_777_216:
            raise ConfigurationError("FLASHTEAM_MAX_BODY must be from 1024 to 16777216 bytes")
        if not 0 < self.reaper_interval <= 1 or self.reaper_batch < 1:
            raise ConfigurationError(
                "FLASHTEAM_REAPER_INTERVAL must be in (0, 1] seconds (holds expire within 1 s)"
                " and FLASHTEAM_REAPER_BATCH >= 1"
            )

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file: from ``sqlite:///...`` or the default under the data dir."""
        url = self.database_url
        if url is None:
            return self.data_dir / "flashteam.db"
        if not url.startswith("sqlite:///"):
            raise ConfigurationError(f"not a SQLite URL: {url.split('://')[0]}://...")
        return Path(url.removeprefix("sqlite:///"))

    def require_tokens(self) -> tuple[str, str]:
        """The gateway and admin tokens; ConfigurationError when either is missing or weak."""
        tokens = []
        for name, value in (
            ("GATEWAY_TOKEN", self.gateway_token),
            ("ADMIN_TOKEN", self.admin_token),
        ):
            if value is None or len(value) < 16:
                raise ConfigurationError(
                    f"{_PREFIX}{name} must be set to a secret of 16 or more characters "
                    "(`flashteam run` generates both when unset)"
                )
            tokens.append(value)
        if tokens[0] == tokens[1]:
            raise ConfigurationError("the gateway and admin tokens must differ")
        return tokens[0], tokens[1]

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests, CLI flags)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``FLASHTEAM_*`` variable; ConfigurationError names a bad one."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(_PREFIX + name)
            return value if value else None

        def number(name: str, kind: type[int] | type[float], default: float) -> float:
            raw = get(name)
            try:
                return default if raw is None else kind(raw)
            except ValueError as exc:
                raise ConfigurationError(f"{_PREFIX}{name} must be a number, not {raw!r}") from exc

        def flag(name: str, default: str = "0") -> bool:
            raw = (get(name) or default).lower()
            if raw not in _FLAGS:
                raise ConfigurationError(f"{_PREFIX}{name} must be 1/0, true/false, yes/no, on/off")
            return _FLAGS[raw]

        return cls(
            redis_url=get("REDIS_URL"),
            redis_cluster=flag("REDIS_CLUSTER"),
            database_url=get("DATABASE_URL"),
            data_dir=Path(get("DATA_DIR") or "var"),
            appendfsync=get("APPENDFSYNC") or "everysec",
            rate_limit=int(number("RATE_LIMIT", int, 5)),
            idempotency_ttl=int(number("IDEMPOTENCY_TTL", int, 86_400)),
            reaper_interval=number("REAPER_INTERVAL", float, 0.2),
            reaper_batch=int(number("REAPER_BATCH", int, 500)),
            flush_batch=int(number("FLUSH_BATCH", int, 1000)),
            claim_idle=number("CLAIM_IDLE", float, 30.0),
            worker_name=get("WORKER_NAME"),
            gateway_token=get("GATEWAY_TOKEN"),
            admin_token=get("ADMIN_TOKEN"),
            max_body=int(number("MAX_BODY", int, 65_536)),
            echo_route=flag("ECHO_ROUTE"),
            coalesce=flag("COALESCE", default="1"),
            coalesce_batch=int(number("COALESCE_BATCH", int, 64)),
            coalesce_window_us=int(number("COALESCE_WINDOW_US", int, 0)),
            sold_out_ttl=number("SOLD_OUT_TTL", float, 0.5),
        )
