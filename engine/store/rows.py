"""Conversions between engine values and SQL rows, shared by every backend.

Rows come back as mappings (sqlite3.Row, asyncpg.Record): read by column name.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from engine.models import (
    Campaign,
    CampaignKind,
    Item,
    Order,
    OrderKind,
    OrderState,
    Seat,
    Team,
    TeamState,
    from_ms,
    to_ms,
)
from engine.store import Archive


class Row(Protocol):
    """A result row readable by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


def _item_json(item: Item) -> dict[str, Any]:
    out: dict[str, Any] = {"sku": item.sku, "price": item.price, "stock": item.stock}
    if item.leader_price is not None:  # absent, not null: the items of older rows read alike
        out["leader_price"] = item.leader_price
    return out


def campaign_row(campaign: Campaign) -> tuple[Any, ...]:
    items = [_item_json(i) for i in campaign.items]
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
        ",".join(str(b) for b in campaign.buckets) if campaign.shards > 1 else None,
        campaign.per_order_limit,
        campaign.auto_success_min_paid,
        campaign.min_pay_seconds,
    )


def campaign_from(row: Row) -> Campaign:
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
        per_order_limit=row["per_order_limit"],
        auto_success_min_paid=row["auto_success_min_paid"],
        min_pay_seconds=row["min_pay_seconds"],
        **_shards(row["shards"]),
    )


def _shards(value: str | None) -> dict[str, Any]:
    """The shards and buckets fields of a campaign row's ``shards`` column."""
    if not value:
        return {}
    buckets = tuple(int(b) for b in value.split(","))
    return {"shards": len(buckets), "buckets": buckets}


def archive_row(archive: Archive) -> tuple[Any, ...]:
    return (
        archive.campaign_id,
        to_ms(archive.archived_at),
        json.dumps(archive.sold_out, sort_keys=True),
        json.dumps(archive.rejections, sort_keys=True),
    )


def order_row(
    order: Order, at_ms: int, idem: str | None = None, restocked: bool | None = None
) -> tuple[Any, ...]:
    return (
        order.order_id,
        order.campaign_id,
        order.user_id,
        order.sku,
        order.qty,
        order.amount,
        order.state.value,
        order.kind.value,
        order.team_id,
        order.payment_ref,
        to_ms(order.created_at),
        to_ms(order.expires_at),
        at_ms,
        order.version,
        idem,
        None if restocked is None else int(restocked),
    )


def order_from(row: Row) -> Order:
    return Order(
        order_id=row["order_id"],
        campaign_id=row["campaign_id"],
        user_id=row["user_id"],
        sku=row["sku"],
        qty=row["qty"],
        amount=row["amount"],
        state=OrderState(row["state"]),
        created_at=from_ms(row["created_at"]),
        expires_at=from_ms(row["expires_at"]),
        version=row["version"],
        kind=OrderKind(row["order_type"]),
        team_id=row["team_id"],
        payment_ref=row["payment_ref"],
    )


def team_row(team: Team, at_ms: int) -> tuple[Any, ...]:
    return (
        team.team_id,
        team.campaign_id,
        team.leader_id,
        team.sku,
        team.qty,
        team.size,
        team.state.value,
        team.why,
        team.held,
        team.paid,
        to_ms(team.created_at),
        None if team.opened_at is None else to_ms(team.opened_at),
        None if team.expires_at is None else to_ms(team.expires_at),
        at_ms,
        team.version,
        ",".join(f"{seat.order_id}={seat.user_id}" for seat in team.seats),
    )


def team_from(row: Row) -> Team:
    seats = row["seats"]
    return Team(
        team_id=row["team_id"],
        campaign_id=row["campaign_id"],
        leader_id=row["leader_id"],
        sku=row["sku"],
        qty=row["qty"],
        size=row["size"],
        state=TeamState(row["state"]),
        created_at=from_ms(row["created_at"]),
        opened_at=None if row["opened_at"] is None else from_ms(row["opened_at"]),
        expires_at=None if row["expires_at"] is None else from_ms(row["expires_at"]),
        held=row["held"],
        paid=row["paid"],
        version=row["version"],
        why=row["why"],
        seats=tuple(Seat(*s.split("=", 1)) for s in seats.split(",")) if seats else (),
    )
