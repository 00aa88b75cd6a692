"""The HTTP contract as msgspec structs (docs/http.md): request bodies are decoded and
validated by these, responses encoded from them, and /openapi.json is generated from the same
structs, so the documented schema and the checked one cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime
from typing import Annotated, Any, Self, TypeVar

import msgspec
from msgspec import Meta, Struct

from engine.errors import TooDeep, ValidationError
from engine.keys import ID_PATTERN, KEY_PATTERN
from engine.models import (
    MAX_AMOUNT,
    MAX_ITEMS,
    MAX_SHARDS,
    MAX_UNITS,
    TEXT_PATTERN,
    CampaignView,
    Item,
    ItemStock,
    Order,
    Team,
    TeamSeatResult,
)
from engine.teams import TeamView, mask_user

T = TypeVar("T")


# The deepest nesting of arrays and objects a body may have; every request needs 3 at most
# (a batch: the envelope, its list, an item).
MAX_DEPTH = 8
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")


def _too_deep() -> TooDeep:
    return TooDeep(f"the body nests arrays and objects more than {MAX_DEPTH} levels deep")


def check_depth(raw: bytes) -> None:
    """TooDeep when ``raw`` nests arrays and objects more than MAX_DEPTH levels, counted over
    its brackets once strings are gone (brackets that do not pair up count as they open, so
    no parser ever recurses past MAX_DEPTH, whatever its own limit); a body with that few
    brackets is not even looked at."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for byte in _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in _OPEN else -1
        if depth > MAX_DEPTH:
            raise _too_deep()


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an int when it is integral."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValidationError(f"the body names the key {key!r} twice", field=key)
        seen.add(key)


def check_shape(raw: bytes) -> None:
    """ValidationError unless ``raw`` has one reading: TooDeep past MAX_DEPTH, and an object
    that names a key twice (which JSON parsers read as the first or the last) is refused."""
    check_depth(raw)
    with contextlib.suppress(ValueError):  # not JSON at all: the decoder names what is wrong
        json.loads(raw, object_pairs_hook=_unique_keys)


def decode_json(decoder: msgspec.json.Decoder[T], raw: bytes, hint: str = "") -> T:
    """A request body decoded by ``decoder`` (an empty body as ``{}``) once it has one
    reading (``check_shape``); ValidationError naming what is wrong (``hint`` added to a
    shape error) when it does not fit."""
    raw = raw or b"{}"
    check_shape(raw)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        # JSON has one number type: 3.0 is the integer 3 (as JSON Schema reads it), which
        # msgspec refuses where an int is due. Such a body is read again with its integral
        # numbers written as integers; any other error stands.
        with contextlib.suppress(msgspec.DecodeError, ValueError):
            return decoder.decode(json.dumps(json.loads(raw, parse_float=_number)).encode())
        raise ValidationError(f"{exc}{hint}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f"the body is not valid UTF-8 JSON: {exc}") from exc


Id = Annotated[str, Meta(pattern=f"^{ID_PATTERN}$", description="[A-Za-z0-9_-]{1,64}")]
Key = Annotated[str, Meta(pattern=f"^{KEY_PATTERN}$", description="[A-Za-z0-9_.:-]{1,128}")]
Units = Annotated[int, Meta(ge=1, le=MAX_UNITS)]
Money = Annotated[int, Meta(ge=0, le=MAX_UNITS * 100, description="minor units (cents)")]
Moment = Annotated[
    datetime,
    Meta(
        tz=True,
        description="RFC 3339 with a UTC offset, from the year 2000 to 9000 (in UTC)",
        # The years the engine takes, 2000 to 8999, as the date's first characters.
        extra_json_schema={"pattern": "^(2[0-9]{3}|[3-8][0-9]{3})-"},
    ),
]
Kind = Annotated[str, Meta(pattern="^(flash|team)$")]
Title = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=TEXT_PATTERN,
        description="free text, without NUL, control or bidirectional-override characters",
    ),
]


class Request(Struct, forbid_unknown_fields=True):
    """Every request body: unknown fields are an error, not silently ignored."""


# --------------------------------------------------------------------------- requests


LeaderPrice = Annotated[
    int,
    Meta(
        ge=0,
        le=MAX_UNITS * 100,
        description="the unit price a team's leader pays, at most price "
        "(docs/lifecycle.md#team-deal-options); absent or null: the leader pays price",
    ),
]
# On a flash campaign a team-only field may be absent or null, nothing else.
NotForFlash = Annotated[None, Meta(description="team campaigns only: absent or null here")]


class FlashItemIn(Request):
    """An item of a flash campaign."""

    sku: Id
    price: Money
    stock: Annotated[int, Meta(ge=0, le=MAX_UNITS)]
    leader_price: NotForFlash = None

    def item(self) -> Item:
        return Item(self.sku, self.price, self.stock)


class ItemIn(Request):
    """An item of a team campaign, or of either kind in an edit."""

    sku: Id
    price: Money
    stock: Annotated[int, Meta(ge=0, le=MAX_UNITS)]
    leader_price: LeaderPrice | None = None

    def item(self) -> Item:
        return Item(self.sku, self.price, self.stock, self.leader_price)


PerOrderLimit = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_UNITS,
        description="at most this many units in one order (a reservation, a new team, a "
        "seat), besides per_user_limit (which it may not exceed); absent or null: no cap",
    ),
]
AutoSuccessMinPaid = Annotated[
    int,
    Meta(
        ge=2,
        le=99,
        description="team campaigns: an open team whose time runs out with at least this "
        "many paid seats (2 to team_size - 1) succeeds instead of failing; absent or null: "
        "it fails (docs/lifecycle.md#team-deal-options)",
    ),
]
MinPaySeconds = Annotated[
    int,
    Meta(
        ge=0,
        le=7 * 86_400,
        description="team campaigns: quick-join and the joinable list offer only teams with "
        "at least this many seconds left, so a seat leaves time to pay (0 to "
        "team_ttl_seconds; 0: any team with time left); absent or null: 30, at most half "
        "the team's time to live; never more than hold_seconds "
        "(docs/lifecycle.md#team-deal-options)",
    ),
]


StartsAt = Annotated[Moment, Meta(examples=["2025-01-01T00:00:00Z"])]
EndsAt = Annotated[
    Moment,
    Meta(
        description="after starts_at and in the future (a new campaign, or a new end)",
        examples=["2999-12-31T23:59:59Z"],
    ),
]
Items = Annotated[list[ItemIn], Meta(min_length=1, max_length=MAX_ITEMS)]
HoldSeconds = Annotated[int, Meta(ge=1, le=86_400)]
TeamSize = Annotated[int, Meta(ge=2, le=100)]
TeamTtlSeconds = Annotated[int, Meta(ge=1, le=7 * 86_400)]


class _CampaignIn(Request, kw_only=True, tag_field="kind"):
    """What every new campaign states. ends_at must be after starts_at and in the future;
    per_order_limit is at most per_user_limit; price x per_user_limit at most 10^15."""

    id: (
        Annotated[
            str,
            Meta(
                pattern=f"^{ID_PATTERN}$",
                description="[A-Za-z0-9_-]{1,64}; absent or null: the engine makes one (c "
                "and 16 hex digits), so only a body with an id is safe to send twice",
            ),
        ]
        | None
    ) = None
    title: Title
    starts_at: StartsAt
    ends_at: EndsAt
    per_user_limit: Units
    hold_seconds: HoldSeconds
    per_order_limit: PerOrderLimit | None = None


class FlashCampaignIn(_CampaignIn, kw_only=True, tag="flash"):
    """A new flash campaign ("kind": "flash"): no team fields."""

    items: Annotated[list[FlashItemIn], Meta(min_length=1, max_length=MAX_ITEMS)]
    shards: Annotated[
        int,
        Meta(
            ge=1,
            le=MAX_SHARDS,
            description="stock buckets on as many Redis Cluster slots, each shopper served by "
            "one (docs/architecture.md#sharded-flash-campaigns); fixed at creation",
        ),
    ] = 1
    team_size: NotForFlash = None
    team_ttl_seconds: NotForFlash = None
    auto_success_min_paid: NotForFlash = None
    min_pay_seconds: NotForFlash = None


class TeamCampaignIn(_CampaignIn, kw_only=True, tag="team"):
    """A new team campaign ("kind": "team"): team_size and team_ttl_seconds are needed;
    an item's leader_price is at most its price, auto_success_min_paid at most team_size - 1,
    min_pay_seconds at most team_ttl_seconds."""

    items: Items
    team_size: TeamSize
    team_ttl_seconds: TeamTtlSeconds
    shards: Annotated[int, Meta(ge=1, le=1, description="a team campaign has one bucket")] = 1
    auto_success_min_paid: AutoSuccessMinPaid | None = None
    min_pay_seconds: MinPaySeconds | None = None


# A new campaign: one of the two, told apart by "kind" (a discriminator in /openapi.json).
CampaignIn = FlashCampaignIn | TeamCampaignIn


class CampaignPatch(Request):
    """Only the fields to change; the campaign lifecycle decides which are allowed when
    (docs/lifecycle.md#campaign)."""

    kind: Kind | msgspec.UnsetType = msgspec.UNSET
    title: Title | msgspec.UnsetType = msgspec.UNSET
    starts_at: StartsAt | msgspec.UnsetType = msgspec.UNSET
    ends_at: EndsAt | msgspec.UnsetType = msgspec.UNSET
    items: Items | msgspec.UnsetType = msgspec.UNSET
    per_user_limit: Units | msgspec.UnsetType = msgspec.UNSET
    hold_seconds: HoldSeconds | msgspec.UnsetType = msgspec.UNSET
    team_size: TeamSize | msgspec.UnsetType = msgspec.UNSET
    team_ttl_seconds: TeamTtlSeconds | msgspec.UnsetType = msgspec.UNSET
    # null switches the option off
    per_order_limit: PerOrderLimit | msgspec.UnsetType | None = msgspec.UNSET
    auto_success_min_paid: AutoSuccessMinPaid | msgspec.UnsetType | None = msgspec.UNSET
    min_pay_seconds: MinPaySeconds | msgspec.UnsetType | None = msgspec.UNSET

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if value is msgspec.UNSET:
                continue
            # Items stay mappings: the engine checks them (leader_price at most price) once it
            # has found the campaign, so an edit of a campaign that does not exist is a 404.
            out[field] = [msgspec.structs.asdict(i) for i in value] if field == "items" else value
        return out


class ReserveIn(Request):
    user_id: Id
    sku: Id
    qty: Units
    idempotency_key: Key


PaidAmount = Annotated[
    int,
    Meta(
        ge=0,
        le=MAX_AMOUNT,
        description="what the shopper paid, in minor units, when the gateway knows it: it must "
        "be the order's amount (quantity x unit price, the leader price for a team's leader), "
        "else 409 amount_mismatch",
    ),
]


class PayIn(Request):
    user_id: Id
    payment_ref: Annotated[
        str,
        Meta(
            pattern=f"^{KEY_PATTERN}$",
            description="the payment provider's reference: it pays this one order (the same "
            "reference on another order is 409 payment_ref_used)",
        ),
    ]
    amount: PaidAmount | None = None


class CancelIn(Request):
    user_id: Id


class RefundIn(Request):
    restock: bool = False


class OpenTeamIn(Request, kw_only=True):
    user_id: Id
    sku: Id
    qty: Units = 1
    idempotency_key: Key


class JoinIn(Request):
    user_id: Id
    idempotency_key: Key


class QuickJoinIn(Request):
    user_id: Id
    sku: Id
    idempotency_key: Key


# --------------------------------------------------------------------------- responses


class ErrorBody(Struct):
    code: str
    message: str


class ErrorOut(Struct):
    """Every 4xx/5xx: ``{"error": {"code", "message", ...details}}``."""

    error: ErrorBody


class OrderOut(Struct):
    order_id: str
    campaign_id: str
    user_id: str
    sku: str
    qty: int
    amount: int
    state: str
    type: str
    team_id: str | None
    payment_ref: str | None
    created_at: datetime
    expires_at: datetime
    version: int

    @classmethod
    def of(cls, order: Order, **extra: Any) -> Self:
        """The order's fields; ``extra`` fills a subclass's own (``replayed``)."""
        return cls(
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
            order.created_at,
            order.expires_at,
            order.version,
            **extra,
        )


class ReservationOut(OrderOut, kw_only=True):
    replayed: bool  # an idempotent retry returned the original order


class OrdersOut(Struct):
    orders: list[OrderOut]


class TeamOut(Struct):
    """A team as a product page or share link shows it: the leader masked, no user ids."""

    team_id: str
    campaign_id: str
    sku: str
    qty: int
    size: int
    state: str
    leader: str
    held: int
    paid: int
    remaining: int
    created_at: datetime
    opened_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def of(cls, team: Team) -> TeamOut:
        return cls(
            team.team_id,
            team.campaign_id,
            team.sku,
            team.qty,
            team.size,
            team.state.value,
            mask_user(team.leader_id),
            team.held,
            team.paid,
            team.remaining,
            team.created_at,
            team.opened_at,
            team.expires_at,
        )


class SeatOut(Struct):
    team_id: str
    order_id: str
    opened: bool
    replayed: bool
    order: OrderOut
    team: TeamOut

    @classmethod
    def of(cls, seat: TeamSeatResult) -> SeatOut:
        return cls(
            seat.team.team_id,
            seat.order.order_id,
            seat.opened,
            seat.replayed,
            OrderOut.of(seat.order),
            TeamOut.of(seat.team),
        )


class TeamsOut(Struct):
    teams: list[TeamOut]


class MemberOut(Struct):
    name: str
    leader: bool
    paid: bool


class ShareOut(Struct):
    team: TeamOut
    share_state: str
    members: list[MemberOut]
    viewer_can_join: bool
    viewer_in_team: bool
    # share_state "succeeded" because the team's time ran out with enough paid seats (the
    # campaign's automatic success), not because every seat was paid.
    auto_succeeded: bool

    @classmethod
    def of(cls, view: TeamView) -> ShareOut:
        return cls(
            TeamOut.of(view.team),
            view.share_state.value,
            [MemberOut(m.name, m.leader, m.paid) for m in view.members],
            view.viewer_can_join,
            view.viewer_in_team,
            view.auto_succeeded,
        )


class StockOut(Struct):
    sku: str
    price: int
    initial: int
    available: int
    held: int
    paid: int
    gone: int
    sold_out_at: datetime | None
    sell_through: float

    @classmethod
    def of(cls, s: ItemStock) -> StockOut:
        through = s.paid / s.initial if s.initial else 0.0
        return cls(
            s.sku, s.price, s.initial, s.available, s.held, s.paid, s.gone, s.sold_out_at, through
        )


class ItemOut(Struct, omit_defaults=True):
    sku: str
    price: int
    stock: int
    leader_price: int | None = None  # only when the item has one


class CampaignOut(Struct):
    id: str
    kind: str
    title: str
    starts_at: datetime
    ends_at: datetime
    items: list[ItemOut]
    per_user_limit: int
    hold_seconds: int
    team_size: int | None
    team_ttl_seconds: int | None
    invalidated_at: datetime | None
    status: str
    stock: list[StockOut]
    shards: int
    per_order_limit: int | None
    auto_success_min_paid: int | None
    min_pay_seconds: int | None

    @classmethod
    def of(cls, view: CampaignView) -> CampaignOut:
        c = view.campaign
        return cls(
            c.id,
            c.kind.value,
            c.title,
            c.starts_at,
            c.ends_at,
            [ItemOut(i.sku, i.price, i.stock, i.leader_price) for i in c.items],
            c.per_user_limit,
            c.hold_seconds,
            c.team_size,
            c.team_ttl_seconds,
            c.invalidated_at,
            view.status.value,
            [StockOut.of(s) for s in view.stock],
            c.shards,
            c.per_order_limit,
            c.auto_success_min_paid,
            c.min_pay_seconds,
        )


class Health(Struct):
    status: str
    checks: dict[str, str] = {}
