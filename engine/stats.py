"""Campaign KPIs (docs/kpis.md) for ``GET /v1/campaigns/{id}/stats``, the load-test report
and operators.

Live stock and the sell-out moment come from the campaign's view (Redis while the campaign is
there); order and team figures from the durable store (they trail Redis by the flush worker's
lag, reported as ``unflushed_events``); rejections by reason from the per-campaign counters
the API processes add to Redis about once a second (``RejectionCounter``). An archived
campaign's figures all come from SQL (engine/archive.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from engine.errors import EngineError
from engine.keys import keys_of
from engine.models import CampaignKind, CampaignView, to_ms
from engine.runtime import Runtime
from engine.scripts import guarded
from engine.shards import outbox_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemKpis:
    sku: str
    price: int
    initial: int
    available: int
    held: int
    orders: int  # every order ever created for the item (held, paid, ended)
    paid_orders: int
    paid_units: int
    gmv: int  # paid amount, minor units (refunded orders excluded)
    average_order_value: float | None
    sell_through: float  # paid units / initial stock
    time_to_sell_out_s: float | None  # from the campaign start to available == 0
    hold_to_paid: float | None  # orders that were paid (incl. later refunded) / orders
    hold_expiry_rate: float | None  # expired / orders
    cancellations: int
    expirations: int
    refunds: int


@dataclass(frozen=True, slots=True)
class TeamKpis:
    created: int
    pending: int
    open: int
    opened: int  # teams whose leader paid (pending ones never opened)
    succeeded: int  # filled + auto_succeeded
    failed: int
    dissolved: int
    success_rate: float | None  # succeeded / (succeeded + failed)
    mean_time_to_fill_s: float | None  # of the filled teams
    joins_per_opened_team: float | None
    filled: int  # succeeded with every seat paid
    # Succeeded automatically: their time ran out with auto_success_min_paid or more paid
    # seats, not all (a campaign option); and the seats they lacked, what the option gave.
    auto_succeeded: int
    auto_unfilled_seats: int


@dataclass(frozen=True, slots=True)
class CampaignStats:
    campaign_id: str
    status: str
    items: list[ItemKpis]
    rejections: dict[str, int]
    teams: TeamKpis | None
    unflushed_events: int


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


async def campaign_stats(rt: Runtime, view: CampaignView) -> CampaignStats:
    """The KPIs of one campaign (``view``: its definition and live status)."""
    campaign = view.campaign
    campaign_id = campaign.id
    starts_ms = to_ms(campaign.starts_at)
    keys = keys_of(campaign_id)
    redis = rt.redis
    rejected: dict[str, int | str]
    if view.archived:  # SQL holds it alone (engine/archive.py), the counters with it
        archive = await rt.store.archive_of(campaign_id)
        rejected, unflushed = dict(archive.rejections if archive else {}), 0
    else:
        rejected = await guarded(redis.hgetall(keys.rejections))
        unflushed = await outbox_entries(redis, campaign.shard_ids)
    totals = await rt.store.order_totals(campaign_id)
    per: dict[tuple[str, str], tuple[int, int, int]] = {
        (t.sku, t.state): (t.orders, t.units, t.amount) for t in totals
    }

    def n(sku: str, state: str, i: int = 0) -> int:
        return per.get((sku, state), (0, 0, 0))[i]

    kpis = []
    for stock in view.stock:
        sku, price, initial, out = stock.sku, stock.price, stock.initial, stock.sold_out_at
        orders = sum(n(sku, s) for s in ("held", "paid", "cancelled", "expired", "refunded"))
        paid, paid_units, gmv = per.get((sku, "paid"), (0, 0, 0))
        kpis.append(
            ItemKpis(
                sku=sku,
                price=price,
                initial=initial,
                available=stock.available,
                held=stock.held,
                orders=orders,
                paid_orders=paid,
                paid_units=paid_units,
                gmv=gmv,
                average_order_value=_ratio(gmv, paid),
                sell_through=paid_units / initial if initial else 0.0,
                time_to_sell_out_s=None if out is None else (to_ms(out) - starts_ms) / 1000,
                hold_to_paid=_ratio(paid + n(sku, "refunded"), orders),
                hold_expiry_rate=_ratio(n(sku, "expired"), orders),
                cancellations=n(sku, "cancelled"),
                expirations=n(sku, "expired"),
                refunds=n(sku, "refunded"),
            )
        )
    teams = None
    if campaign.kind is CampaignKind.TEAM:
        teams = await _team_kpis(rt, campaign_id, sum(t.orders for t in totals))
    return CampaignStats(
        campaign_id=campaign_id,
        status=view.status.value,
        items=kpis,
        rejections={code: int(count) for code, count in sorted(rejected.items())},
        teams=teams,
        unflushed_events=unflushed,
    )


async def _team_kpis(rt: Runtime, campaign_id: str, totals_orders: int) -> TeamKpis:
    states = await rt.store.team_totals(campaign_id)
    fill = await rt.store.team_fill(campaign_id)
    opened, fill_ms = fill.opened, fill.fill_ms
    created = sum(states.values())
    succeeded, failed = states.get("succeeded", 0), states.get("failed", 0)
    # Every team order is a seat; each team has exactly one leader's seat.
    joins = totals_orders - created
    return TeamKpis(
        created=created,
        pending=states.get("pending", 0),
        open=states.get("open", 0),
        opened=opened,
        succeeded=succeeded,
        failed=failed,
        dissolved=states.get("dissolved", 0),
        success_rate=_ratio(succeeded, succeeded + failed),
        mean_time_to_fill_s=None if fill_ms is None else fill_ms / 1000,
        joins_per_opened_team=_ratio(joins, opened),
        filled=succeeded - fill.auto,
        auto_succeeded=fill.auto,
        auto_unfilled_seats=fill.unfilled,
    )


class RejectionCounter:
    """Rejections per (campaign, code), counted in process and added to Redis in one go about
    once a second: a sold-out storm costs no extra Redis call per request."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._counts: Counter[tuple[str, str]] = Counter()

    def count(self, campaign_id: str, code: str) -> None:
        self._counts[(campaign_id, code)] += 1

    async def flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        for (campaign_id, code), n in counts.items():
            try:
                await guarded(self._rt.redis.hincrby(keys_of(campaign_id).rejections, code, n))
            except EngineError:
                self._counts[(campaign_id, code)] += n  # Redis is away: keep them for later
                raise
