"""The live sale page: ``GET /live`` (a page with no data in it) and ``GET /v1/live`` (the
JSON it polls about once a second, admin token only).

The page asks for the admin token once, keeps it in the tab's sessionStorage and sends it as
``Authorization: Bearer``: it never appears in a URL, so neither in access logs nor in the
browser's history. Everything it needs is in this package (``static/live.html``: plain SVG
drawn by its own script, no library, no network fetch but ``/v1/live``).

``/v1/live`` sends cumulative figures, read the same way as the endpoints they mirror (each
campaign's KPIs are exactly ``GET /v1/campaigns/{id}/stats``); the page turns the difference
between two polls into rates (orders and payments per second, requests per second by route
and outcome) and into each route's p99 over the last interval (from the latency histogram's
buckets), so it does not matter which API worker answers a poll.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache
from importlib import resources

from msgspec import Struct

from engine.api import metrics
from engine.core import Engine
from engine.keys import DEAD_LETTERS, keys_of
from engine.local.launcher import restarts
from engine.scripts import guarded
from engine.stats import CampaignStats, campaign_stats
from engine.worker import FlushWorker

# Campaigns shown: those not archived that end after this long ago (and the scheduled ones).
RECENT = timedelta(hours=1)
MAX_CAMPAIGNS = 12


class LiveCampaign(Struct):
    """One campaign: its definition, the orders Redis has created so far (live), and its KPIs
    (``GET /v1/campaigns/{id}/stats``)."""

    id: str
    title: str
    kind: str
    status: str
    starts_at: datetime
    ends_at: datetime
    orders_created: int
    stats: CampaignStats


class RouteLoad(Struct):
    """One route's requests so far, every outcome together: the count, how many were shed
    (503 overloaded, docs/http.md#overload), and the latency histogram as (upper bound in
    seconds, requests at or under it) pairs, the last one's bound null (+Inf)."""

    route: str
    count: float
    shed: float
    buckets: list[tuple[float | None, float]]


class EngineLoad(Struct):
    """The engine as a whole: requests so far per route and per outcome, and its lags."""

    routes: list[RouteLoad]
    outcomes: dict[str, float]
    stream_lag_s: float
    reaper_lag_s: float
    unflushed: int
    dead_letters: int
    restarts: dict[str, int]  # per process restarted by `flashteam run` (empty: unsupervised)


class LiveOut(Struct):
    """What the live page polls."""

    at: datetime
    campaigns: list[LiveCampaign]
    engine: EngineLoad


@cache
def asset(name: str) -> bytes:
    """A file of the live page (live.html, live.js, live.css), shipped inside the package."""
    return resources.files("engine.api").joinpath("static", name).read_bytes()


async def snapshot(engine: Engine) -> LiveOut:
    """Every figure of the live page, read now."""
    rt = engine.runtime
    now = await rt.now()
    campaigns = await rt.store.campaigns_ending_after(now - RECENT)
    shown = sorted(campaigns, key=lambda c: c.starts_at, reverse=True)[:MAX_CAMPAIGNS]
    out = []
    for campaign in shown:
        view = await engine.campaigns.get(campaign.id)
        stats = await campaign_stats(rt, view)
        created = 0
        for shard in campaign.shard_ids:  # every stock bucket's (engine/shards.py)
            created += int(await guarded(rt.redis.hlen(keys_of(shard).orders)))
        out.append(
            LiveCampaign(
                id=campaign.id,
                title=campaign.title,
                kind=campaign.kind.value,
                status=view.status.value,
                starts_at=campaign.starts_at,
                ends_at=campaign.ends_at,
                orders_created=int(created) or sum(item.orders for item in stats.items),
                stats=stats,
            )
        )
    lag = await FlushWorker(rt, name="live").lag()
    routes, outcomes = metrics.request_load()
    return LiveOut(
        at=now,
        campaigns=out,
        engine=EngineLoad(
            routes=[RouteLoad(route, *load) for route, load in routes],
            outcomes=outcomes,
            stream_lag_s=lag.oldest_ms / 1000,
            reaper_lag_s=await metrics.reaper_lag(rt),
            unflushed=lag.unflushed,
            dead_letters=int(await guarded(rt.redis.xlen(DEAD_LETTERS))),
            restarts=restarts(rt.settings.data_dir),
        ),
    )
