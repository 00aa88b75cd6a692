"""Prometheus metrics of the API (docs/kpis.md#engine-metrics).

Request and script latencies are histograms kept by prometheus_client; with several worker
processes (`flashteam serve --workers N`) they live in ``PROMETHEUS_MULTIPROC_DIR`` and any
worker's /metrics sums them all. Stream lag and reaper lag are read from Redis at scrape time,
so they are right whichever worker answers; a worker reads them at most once a second
(``Cached``), however often it is scraped, and waits at most a second for each of Redis and
SQL: anyone who can reach the port cannot load the sale's Redis through /metrics.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from engine.archive import ARCHIVE_STATS
from engine.errors import EngineError, Unavailable
from engine.keys import CAMPAIGN_SET, DEAD_LETTERS, keys_of
from engine.local.launcher import restarts
from engine.recovery import RECOVERY_STATS, REPAIR_REASONS, Recovery
from engine.runtime import Runtime
from engine.scripts import guarded
from engine.shards import REBALANCE_STATS
from engine.worker import FlushWorker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_REQUESTS_NAME = "flashteam_http_request_seconds"
_REQUESTS = Histogram(
    _REQUESTS_NAME,
    "HTTP requests by route and outcome (ok or the error code), with their latency",
    ["route", "outcome"],
    buckets=_BUCKETS,
)
_SCRIPTS = Histogram(
    "flashteam_script_seconds", "Lua script calls and their latency", ["script"], buckets=_BUCKETS
)
_PAYMENTS = Histogram(
    "flashteam_payment_commit_seconds",
    "Where a durable payment's wait for SQL goes, per payment: queue (for the group commit "
    "that carries it), commit (that SQL transaction, lock waits included), durable (the "
    "whole wait, tries and read-backs included); its Redis part is the pay_order script",
    ["part"],
    buckets=_BUCKETS,
)

# Admission control (engine/api/admission.py), sampled at each flush: summed over the workers.
_ADMISSION_LIMIT = Gauge(
    "flashteam_admission_limit",
    "Requests the API workers may run at once (their adaptive admission limits, summed)",
    multiprocess_mode="livesum",
)
_ADMISSION_IN_FLIGHT = Gauge(
    "flashteam_admission_in_flight",
    "Requests the API workers run right now (sampled a few times a second, summed)",
    multiprocess_mode="livesum",
)


def observe_admission(limit: float, in_flight: int) -> None:
    _ADMISSION_LIMIT.set(int(limit))
    _ADMISSION_IN_FLIGHT.set(in_flight)


class _Buffered:
    """Observations of one histogram kept in this process and added to it in one go by
    ``flush`` (a few times a second): an observation costs a bisect and two additions
    instead of two locked writes to prometheus_client's memory-mapped files (with several
    API workers). Adding counts to a child at once uses its ``_sum`` and ``_buckets`` values,
    prometheus_client's own per-bucket counters (there is no public bulk observe)."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._pending: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        pending = self._pending.get(labels)
        if pending is None:
            pending = self._pending[labels] = ([0] * (len(_BUCKETS) + 1), [0.0])
        pending[0][bisect_left(_BUCKETS, seconds)] += 1
        pending[1][0] += seconds

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, (counts, total) in pending.items():
            child: Any = self._histogram.labels(*labels)
            child._sum.inc(total[0])
            for bucket, count in zip(child._buckets, counts, strict=True):
                if count:
                    bucket.inc(count)


_requests = _Buffered(_REQUESTS)
_scripts = _Buffered(_SCRIPTS)
_payments = _Buffered(_PAYMENTS)
FLUSH_EVERY = 0.1  # seconds between flushes by the API's background task


def observe_request(route: str, outcome: str, seconds: float) -> None:
    _requests.observe((route, outcome), seconds)


def observe_script(script: str, seconds: float) -> None:
    _scripts.observe((script,), seconds)


def observe_payment(part: str, seconds: float) -> None:
    _payments.observe((part,), seconds)


def flush() -> None:
    """Add this process's buffered observations to the histograms (before a scrape, and
    every ``FLUSH_EVERY`` seconds)."""
    _requests.flush()
    _scripts.flush()
    _payments.flush()


def _registry() -> CollectorRegistry | None:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


# A latency histogram: (upper bound in seconds, None for +Inf; requests at or under it).
Buckets = list[tuple[float | None, float]]


def request_load() -> tuple[list[tuple[str, tuple[float, float, Buckets]]], dict[str, float]]:
    """The HTTP requests so far, of this process or (with several workers) of all of them:
    per route, the count, how many of them were shed (503 overloaded) and the cumulative
    latency buckets, every outcome summed (routes in order); and the count per outcome, every
    route summed."""
    flush()
    registry = _registry()
    families = (registry or REGISTRY).collect()
    buckets: dict[str, dict[float, float]] = {}
    counts: dict[str, float] = {}
    shed: dict[str, float] = {}
    outcomes: dict[str, float] = {}
    for family in families:
        if family.name != _REQUESTS_NAME:
            continue
        for sample in family.samples:
            route, outcome = sample.labels["route"], sample.labels["outcome"]
            if sample.name.endswith("_bucket"):
                per = buckets.setdefault(route, {})
                bound = float(sample.labels["le"])
                per[bound] = per.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                counts[route] = counts.get(route, 0.0) + sample.value
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
                if outcome == "overloaded":
                    shed[route] = shed.get(route, 0.0) + sample.value
    routes = [
        (r, (counts.get(r, 0.0), shed.get(r, 0.0), _bounded(buckets[r]))) for r in sorted(buckets)
    ]
    return routes, outcomes


def _bounded(buckets: dict[float, float]) -> Buckets:
    """The buckets in order, +Inf (which JSON cannot write) as None."""
    return [(None if math.isinf(le) else le, n) for le, n in sorted(buckets.items())]


T = TypeVar("T")


class Cached(Generic[T]):
    """What ``compute`` returns, computed at most once per ``every`` seconds: callers in
    between get the last result, concurrent callers share one computation."""

    def __init__(self, compute: Callable[[], Awaitable[T]], every: float) -> None:
        self._compute = compute
        self._every = every
        self._last: tuple[float, T] | None = None
        self._running: asyncio.Task[T] | None = None

    async def get(self) -> T:
        last = self._last
        if last is not None and time.monotonic() - last[0] < self._every:
            return last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._running)

    async def _run(self) -> T:
        try:
            value = await self._compute()
            self._last = (time.monotonic(), value)
            return value
        finally:
            self._running = None


def render(dependencies: list[str]) -> bytes:
    """The exposition text: this process's (or every worker's) histograms, then
    ``dependencies`` (what ``dependencies`` read)."""
    flush()
    registry = _registry()
    text = generate_latest(registry) if registry is not None else generate_latest()
    return text + ("\n".join(dependencies) + "\n").encode()


async def dependencies(rt: Runtime, within: float) -> list[str]:
    """Whether Redis and SQL answer (within ``within`` seconds each), and what is read from
    Redis at scrape time (stream and reaper lag, dead letters, fenced campaigns, repair and
    archival counters). With Redis down or stalled the Redis-read gauges are left out and
    ``flashteam_redis_up`` is 0, so the alert still has its metric."""
    sql_up, from_redis = await asyncio.gather(
        _answers(rt.store.get_campaign("metrics-probe"), within), _redis_lines(rt, within)
    )
    return [
        "# HELP flashteam_redis_up 1 when Redis answered this scrape, else 0.",
        "# TYPE flashteam_redis_up gauge",
        f"flashteam_redis_up {int(bool(from_redis))}",
        "# HELP flashteam_sql_up 1 when the durable store answered this scrape, else 0.",
        "# TYPE flashteam_sql_up gauge",
        f"flashteam_sql_up {int(sql_up)}",
        *_restarts(rt),
        *from_redis,
    ]


def _restarts(rt: Runtime) -> list[str]:
    """Restarts of each process by `flashteam run` (none under another supervisor)."""
    counts = restarts(rt.settings.data_dir)
    if not counts:
        return []
    return [
        "# HELP flashteam_process_restarts_total Processes `flashteam run` restarted after they "
        "exited, by process (serve: the HTTP API, worker: the flush worker, reaper).",
        "# TYPE flashteam_process_restarts_total counter",
        *(f'flashteam_process_restarts_total{{process="{p}"}} {n}' for p, n in counts.items()),
    ]


async def _redis_lines(rt: Runtime, within: float) -> list[str]:
    try:
        return await asyncio.wait_for(_from_redis(rt), within)
    except (Unavailable, TimeoutError):
        return []


async def _answers(probe: Awaitable[object], within: float) -> bool:
    try:
        await asyncio.wait_for(probe, within)
    except (EngineError, TimeoutError):
        return False
    return True


async def _from_redis(rt: Runtime) -> list[str]:
    lag = await FlushWorker(rt, name="metrics").lag()
    overdue = await reaper_lag(rt)
    stats: dict[str, str] = await guarded(rt.redis.hgetall(RECOVERY_STATS))
    fenced, unverified = await untrusted_campaigns(rt)
    dead = int(await guarded(rt.redis.xlen(DEAD_LETTERS)))
    return [
        "# HELP flashteam_stream_unflushed Outbox entries not yet committed to SQL.",
        "# TYPE flashteam_stream_unflushed gauge",
        f"flashteam_stream_unflushed {lag.unflushed}",
        "# HELP flashteam_stream_pending Outbox entries read by a flush worker, not yet acked.",
        "# TYPE flashteam_stream_pending gauge",
        f"flashteam_stream_pending {lag.pending}",
        "# HELP flashteam_stream_lag_seconds Age of the oldest unflushed outbox entry.",
        "# TYPE flashteam_stream_lag_seconds gauge",
        f"flashteam_stream_lag_seconds {lag.oldest_ms / 1000}",
        "# HELP flashteam_reaper_lag_seconds How far past its deadline the most overdue hold is.",
        "# TYPE flashteam_reaper_lag_seconds gauge",
        f"flashteam_reaper_lag_seconds {overdue}",
        "# HELP flashteam_dead_letters Outbox entries the flush worker could not decode (ft:dead).",
        "# TYPE flashteam_dead_letters gauge",
        f"flashteam_dead_letters {dead}",
        "# HELP flashteam_campaigns_fenced Campaigns fenced: a repair from SQL is due or "
        "running; they answer 'recovering'.",
        "# TYPE flashteam_campaigns_fenced gauge",
        f"flashteam_campaigns_fenced {fenced}",
        "# HELP flashteam_campaigns_unverified Campaigns not yet verified on a new server (a "
        "replica attached, a restart, a promotion): their next call verifies them against SQL.",
        "# TYPE flashteam_campaigns_unverified gauge",
        f"flashteam_campaigns_unverified {unverified}",
        "# HELP flashteam_recoveries_total Campaigns repaired from SQL after Redis lost writes.",
        "# TYPE flashteam_recoveries_total counter",
        f"flashteam_recoveries_total {int(stats.get('repairs', 0))}",
        "# HELP flashteam_recovery_failures_total Repairs that failed (retried on next use).",
        "# TYPE flashteam_recovery_failures_total counter",
        f"flashteam_recovery_failures_total {int(stats.get('failures', 0))}",
        "# HELP flashteam_repairs_total Repairs from SQL by reason: missing (Redis lost the "
        "campaign), restarted (a restarted or promoted server), behind (Redis's ids behind "
        "SQL's), collision (an id SQL holds for another order), fenced, archival, manual.",
        "# TYPE flashteam_repairs_total counter",
        *(
            f'flashteam_repairs_total{{why="{why}"}} {int(stats.get(f"why:{why}", 0))}'
            for why in REPAIR_REASONS
        ),
        "# HELP flashteam_recovery_verifications_total Campaigns (each stock bucket of a sharded "
        "one) found whole on a new Redis server: checked against SQL, nothing repaired.",
        "# TYPE flashteam_recovery_verifications_total counter",
        f"flashteam_recovery_verifications_total {int(stats.get('verified', 0))}",
        *await _archival(rt),
        *await _rebalancing(rt),
    ]


async def _archival(rt: Runtime) -> list[str]:
    """The archival counters (engine/archive.py): campaigns archived, and attempts that left
    one in Redis per reason."""
    counts: dict[str, str] = await guarded(rt.redis.hgetall(ARCHIVE_STATS))
    refusals = sorted((k.split(":", 1)[1], int(v)) for k, v in counts.items() if ":" in k)
    return [
        "# HELP flashteam_campaigns_archived_total Campaigns archived out of Redis into SQL.",
        "# TYPE flashteam_campaigns_archived_total counter",
        f"flashteam_campaigns_archived_total {int(counts.get('archived', 0))}",
        "# HELP flashteam_archive_refusals_total Archival attempts that left a campaign in "
        "Redis, by reason (differs: Redis and SQL disagree).",
        "# TYPE flashteam_archive_refusals_total counter",
        *(f'flashteam_archive_refusals_total{{reason="{r}"}} {n}' for r, n in refusals),
    ]


async def _rebalancing(rt: Runtime) -> list[str]:
    """The rebalancer's counters of every process (engine/shards.py, sharded campaigns)."""
    counts: dict[str, str] = await guarded(rt.redis.hgetall(REBALANCE_STATS))
    lines = []
    for field, name, what in (
        ("transfers", "transfers", "Transfers of stock between the buckets of sharded campaigns."),
        ("moved", "units_moved", "Units those transfers moved."),
        ("finished", "pending_finished", "Transfers left in transit, finished by another caller."),
        (
            "gave_up",
            "gave_up",
            "Reservations answered sold_out after every refill round (busy "
            "buckets, stock not proven sold out).",
        ),
    ):
        metric = f"flashteam_rebalancer_{name}_total"
        lines += [
            f"# HELP {metric} {what}",
            f"# TYPE {metric} counter",
            f"{metric} {int(counts.get(field, 0))}",
        ]
    return lines


async def untrusted_campaigns(rt: Runtime) -> tuple[int, int]:
    """Campaigns of ``ft:campaigns`` whose operations answer recovering right now: (fenced: a
    repair is due or running, unverified: no fence, but on a server they were not verified
    on (a replica attached, a restart, a promotion); the first call of each verifies it
    against SQL, so an idle campaign can stay so harmlessly)."""
    campaigns: set[str] = await guarded(rt.redis.smembers(CAMPAIGN_SET))
    recovery = Recovery(rt)
    fenced = unverified = 0
    for campaign_id in sorted(campaigns):
        shards = (await rt.layout(campaign_id)).shards  # any stock bucket fenced
        if any([await guarded(rt.redis.hexists(keys_of(s).meta, "fence")) for s in shards]):
            fenced += 1
        elif not await recovery.trusted(campaign_id):
            unverified += 1
    return fenced, unverified


async def reaper_lag(rt: Runtime) -> float:
    """Seconds the most overdue held order or team is past its deadline (0 when none is)."""
    redis = rt.redis
    now_ms = int((await rt.now()).timestamp() * 1000)
    worst = 0
    campaigns: set[str] = await guarded(redis.smembers(CAMPAIGN_SET))
    for campaign_id in campaigns:
        keys = keys_of(campaign_id)
        indexes = [keys.team_expiry]  # and each stock bucket's holds (engine/shards.py)
        indexes += [keys_of(shard).deadlines for shard in (await rt.layout(campaign_id)).shards]
        for index in indexes:
            first = await guarded(redis.zrange(index, 0, 0, withscores=True))
            if first:
                worst = max(worst, now_ms - int(first[0][1]))
    return worst / 1000
