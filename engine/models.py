"""Values the engine hands out: campaigns, items, orders, and their states.

Times are UTC-aware datetimes in Python and integer milliseconds in Redis; money is integer
minor units (cents), never floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Final

from engine.errors import ValidationError
from engine.keys import MAX_BUCKET, campaign_of_order, campaign_of_team, check_id, shard_id

MAX_ITEMS = 100
MAX_UNITS = 1_000_000_000
# The largest amount one order may reach (price x per-user limit), in minor units: Lua numbers
# are doubles, exact up to 2^53, and order records must hold exact integers.
MAX_AMOUNT = 10**15
# The most stock buckets (Redis Cluster slots) one flash campaign may spread over.
MAX_SHARDS = 16
# Seconds of time to pay a team must have left to be offered by quick-join and the joinable
# list, unless the campaign says otherwise (Campaign.quick_join_min_ms).
DEFAULT_MIN_PAY_SECONDS = 30


class CampaignKind(StrEnum):
    FLASH = "flash"
    TEAM = "team"


class CampaignStatus(StrEnum):
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    ENDED = "ended"
    INVALIDATED = "invalidated"


class OrderState(StrEnum):
    HELD = "held"
    PAID = "paid"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUNDED = "refunded"


class OrderKind(StrEnum):
    FLASH = "flash"
    TEAM = "team"


class TeamState(StrEnum):
    PENDING = "pending"  # leader's order held, unpaid: not open, no clock, not joinable
    OPEN = "open"  # leader paid: joinable until expires_at
    SUCCEEDED = "succeeded"  # every seat paid, or (why "auto") enough of them at expiry
    FAILED = "failed"  # expired before success, or the campaign was invalidated
    DISSOLVED = "dissolved"  # the leader never paid (or cancelled)


# The ``why`` of a team that succeeded automatically at its expiry (lua/lib/release.lua).
AUTO_SUCCESS = "auto"

_TEAM_CODES = {
    "W": TeamState.PENDING,
    "O": TeamState.OPEN,
    "S": TeamState.SUCCEEDED,
    "F": TeamState.FAILED,
    "D": TeamState.DISSOLVED,
}
_STATE_CODES = {
    "H": OrderState.HELD,
    "P": OrderState.PAID,
    "C": OrderState.CANCELLED,
    "E": OrderState.EXPIRED,
    "R": OrderState.REFUNDED,
}
_KIND_CODES = {"f": OrderKind.FLASH, "t": OrderKind.TEAM}
_TEAM_LETTERS = {state: letter for letter, state in _TEAM_CODES.items()}
_STATE_LETTERS = {state: letter for letter, state in _STATE_CODES.items()}
_KIND_LETTERS = {kind: letter for letter, kind in _KIND_CODES.items()}


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    return round(moment.timestamp() * 1000)


@lru_cache(maxsize=1024)  # the orders of one coalesced batch share their timestamps
def from_ms(ms: int) -> datetime:
    """The UTC datetime of a millisecond timestamp."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# Free text (a campaign's title): printable characters only. NUL (which PostgreSQL refuses
# and SQLite stores), the C0 and C1 controls, and the bidirectional overrides and isolates
# (which make a title display as something other than what it is) are refused.
TEXT_PATTERN: Final = "^[^\\x00-\\x1f\\x7f-\\x9f\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069]*$"
_TEXT = re.compile(TEXT_PATTERN)


def check_int(value: object, field: str, low: int, high: int) -> int:
    """``value`` when it is an integer (not a bool) from ``low`` to ``high``, else
    ValidationError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{field} must be an integer from {low} to {high}", field=field)
    return value


_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def aware_utc(value: object, field: str) -> datetime:
    """A timezone-aware moment in UTC, between the years 2000 and 9000."""
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationError(f"{field} must be a timezone-aware datetime", field=field)
    try:
        moment = value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise ValidationError(f"{field} is out of range", field=field) from exc
    if not _EARLIEST <= moment < _LATEST:
        raise ValidationError(f"{field} must be between 2000 and 9000", field=field)
    return moment


@dataclass(frozen=True, slots=True)
class Item:
    """One item on sale: its sku, unit price in minor units and the stock offered; for a
    team campaign, optionally the unit price the team's leader pays (``leader_price``, at
    most ``price``; None: the leader pays ``price`` like every member)."""

    sku: str
    price: int
    stock: int
    leader_price: int | None = None

    def __post_init__(self) -> None:
        check_id(self.sku, "sku")
        check_int(self.price, "price", 0, MAX_UNITS * 100)
        check_int(self.stock, "stock", 0, MAX_UNITS)
        if self.leader_price is not None:
            check_int(self.leader_price, "leader_price", 0, MAX_UNITS * 100)
            if self.leader_price > self.price:
                raise ValidationError(
                    f"leader_price of {self.sku} must be at most its price ({self.price})",
                    field="leader_price",
                )


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign definition (docs/lifecycle.md#campaign); construction validates every field."""

    id: str
    kind: CampaignKind
    title: str
    starts_at: datetime
    ends_at: datetime
    items: tuple[Item, ...]
    per_user_limit: int
    hold_seconds: int
    team_size: int | None = None
    team_ttl_seconds: int | None = None
    invalidated_at: datetime | None = None
    # Stock buckets on as many Redis Cluster slots (engine/shards.py); flash campaigns only.
    shards: int = 1
    # The bucket numbers (``{c:<id>:<k>}`` tags; 0 first), chosen at creation so the slots
    # land on different masters; () until placed, and always for one bucket.
    buckets: tuple[int, ...] = ()
    # At most this many units in one order (a reservation, a new team, a seat), besides the
    # per-user total; None: no cap but the per-user limit.
    per_order_limit: int | None = None
    # Team campaigns: an open team whose time runs out with at least this many paid seats
    # (2 to team_size - 1) succeeds instead of failing; None: it fails
    # (docs/lifecycle.md#team-deal-options).
    auto_success_min_paid: int | None = None
    # Team campaigns: quick-join and the joinable list offer only teams with at least this
    # many seconds left, so a seat leaves time to pay (0: any team with time left); None: the
    # default, DEFAULT_MIN_PAY_SECONDS (docs/lifecycle.md#team-deal-options).
    min_pay_seconds: int | None = None

    def __post_init__(self) -> None:
        check_id(self.id, "id")
        try:
            object.__setattr__(self, "kind", CampaignKind(self.kind))
        except ValueError as exc:
            raise ValidationError("kind must be 'flash' or 'team'", field="kind") from exc
        if not isinstance(self.title, str) or not 1 <= len(self.title) <= 200:
            raise ValidationError("title must be 1 to 200 characters", field="title")
        if not _TEXT.fullmatch(self.title):
            raise ValidationError(
                "title must not contain NUL, control or bidirectional-override characters",
                field="title",
            )
        starts, ends = aware_utc(self.starts_at, "starts_at"), aware_utc(self.ends_at, "ends_at")
        if ends <= starts:
            raise ValidationError("ends_at must be after starts_at", field="ends_at")
        if not self.items or len(self.items) > MAX_ITEMS:
            raise ValidationError(f"items must hold 1 to {MAX_ITEMS} items", field="items")
        if len({item.sku for item in self.items}) != len(self.items):
            raise ValidationError("every item needs its own sku", field="items")
        check_int(self.per_user_limit, "per_user_limit", 1, MAX_UNITS)
        if max(item.price for item in self.items) * self.per_user_limit > MAX_AMOUNT:
            raise ValidationError(
                f"price x per_user_limit must stay within {MAX_AMOUNT} minor units",
                field="per_user_limit",
            )
        check_int(self.hold_seconds, "hold_seconds", 1, 86_400)
        self._check_team_fields()
        self._check_deal_options()
        self._check_shards()

    def _check_team_fields(self) -> None:
        if self.kind is CampaignKind.TEAM:
            check_int(self.team_size, "team_size", 2, 100)
            check_int(self.team_ttl_seconds, "team_ttl_seconds", 1, 7 * 86_400)
        elif self.team_size is not None or self.team_ttl_seconds is not None:
            raise ValidationError(
                "team_size and team_ttl_seconds belong to team campaigns only", field="kind"
            )

    def _check_deal_options(self) -> None:
        """The per-order cap (either kind), and the team-only options: automatic success at
        expiry and leader prices."""
        if self.per_order_limit is not None:
            check_int(self.per_order_limit, "per_order_limit", 1, MAX_UNITS)
            if self.per_order_limit > self.per_user_limit:
                raise ValidationError(
                    f"per_order_limit must be at most per_user_limit ({self.per_user_limit})",
                    field="per_order_limit",
                )
        if self.auto_success_min_paid is not None:
            self._check_auto_success(self.auto_success_min_paid)
        if self.min_pay_seconds is not None:
            field = "min_pay_seconds"
            if self.kind is not CampaignKind.TEAM:
                raise ValidationError(f"{field} belongs to team campaigns only", field=field)
            check_int(self.min_pay_seconds, field, 0, self.team_ttl_seconds or 0)
        if self.kind is not CampaignKind.TEAM and any(
            item.leader_price is not None for item in self.items
        ):
            raise ValidationError(
                "leader_price belongs to team campaigns only", field="leader_price"
            )

    @property
    def quick_join_min_ms(self) -> int:
        """The time to pay (ms) a team must have left for quick-join and the joinable list
        to offer it: ``min_pay_seconds``, or by default 30 s but at most half the team's time
        to live (a short-lived team is offered for its first half); never more than the hold,
        which bounds a seat's time to pay anyway."""
        if self.min_pay_seconds is not None:
            wanted = self.min_pay_seconds * 1000
        else:
            wanted = min(DEFAULT_MIN_PAY_SECONDS * 1000, (self.team_ttl_seconds or 0) * 500)
        return min(wanted, self.hold_seconds * 1000)

    def _check_auto_success(self, min_paid: int) -> None:
        field = "auto_success_min_paid"
        if self.kind is not CampaignKind.TEAM:
            raise ValidationError(f"{field} belongs to team campaigns only", field=field)
        size = self.team_size or 0
        if size <= 2:
            raise ValidationError(
                f"{field} is 2 to team_size - 1: it needs teams of 3 or more seats", field=field
            )
        check_int(min_paid, field, 2, size - 1)

    def _check_shards(self) -> None:
        check_int(self.shards, "shards", 1, MAX_SHARDS)
        if self.shards > 1 and self.kind is CampaignKind.TEAM:
            raise ValidationError(
                "shards: sharding is for flash campaigns only (a team's seats, its members' "
                "orders and the joinable index must share one slot)",
                field="shards",
            )
        buckets = tuple(self.buckets)
        if self.shards == 1 and buckets in ((), (0,)):
            object.__setattr__(self, "buckets", ())
            return
        if buckets == ():
            return  # not placed yet (engine.campaigns places it at creation)
        if (
            len(buckets) != self.shards
            or buckets[0] != 0
            or len(set(buckets)) != len(buckets)
            or not all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= MAX_BUCKET
                for b in buckets
            )
        ):
            raise ValidationError(
                f"buckets must be {self.shards} distinct numbers from 0 to {MAX_BUCKET}, 0 first",
                field="buckets",
            )
        object.__setattr__(self, "buckets", buckets)

    @property
    def shard_ids(self) -> tuple[str, ...]:
        """The shard id of every stock bucket, bucket 0 (the campaign id) first."""
        if self.shards == 1:
            return (self.id,)
        if not self.buckets:
            raise ValidationError("a sharded campaign is placed at creation", field="buckets")
        return tuple(shard_id(self.id, bucket) for bucket in self.buckets)

    def bucket_stock(self, item: Item, index: int) -> int:
        """The units of ``item`` bucket ``index`` starts with: the stock split evenly, the
        remainder to the first buckets."""
        share, extra = divmod(item.stock, self.shards)
        return share + (1 if index < extra else 0)

    def status(self, now: datetime) -> CampaignStatus:
        """Lifecycle status at ``now`` (docs/lifecycle.md#campaign)."""
        if self.invalidated_at is not None:
            return CampaignStatus.INVALIDATED
        if now < self.starts_at:
            return CampaignStatus.SCHEDULED
        if now >= self.ends_at:
            return CampaignStatus.ENDED
        return CampaignStatus.ACTIVE

    def item(self, sku: str) -> Item | None:
        """The item with this sku, if the campaign sells it."""
        return next((item for item in self.items if item.sku == sku), None)


@dataclass(frozen=True, slots=True)
class ItemStock:
    """Live inventory of one item; available + held + paid + gone == initial (invariant I1,
    docs/invariants.md)."""

    sku: str
    price: int
    initial: int
    available: int
    held: int
    paid: int
    gone: int  # refunded without restock: left the sale
    sold_out_at: datetime | None = None  # when available first reached 0

    @classmethod
    def counted(
        cls, item: Item, held: int, paid: int, gone: int, sold_out_ms: int | None
    ) -> ItemStock:
        """An item's stock from its held, paid and gone units, the rest available (I1)."""
        return cls(
            sku=item.sku,
            price=item.price,
            initial=item.stock,
            available=item.stock - held - paid - gone,
            held=held,
            paid=paid,
            gone=gone,
            sold_out_at=None if sold_out_ms is None else from_ms(sold_out_ms),
        )


@dataclass(frozen=True, slots=True)
class CampaignView:
    """A campaign with its live status and stock, as read from Redis; from SQL once the
    campaign is ``archived`` (engine/archive.py)."""

    campaign: Campaign
    status: CampaignStatus
    stock: tuple[ItemStock, ...]
    archived: bool = False


# Records decoded per request are plain, not frozen, dataclasses: a frozen dataclass's
# __init__ sets each field through object.__setattr__, about 7x slower. Treat them as read-only.
@dataclass(slots=True)
class Order:
    """One user's claim on ``qty`` units of one item, as stored in Redis."""

    order_id: str
    campaign_id: str
    user_id: str
    sku: str
    qty: int
    amount: int
    state: OrderState
    created_at: datetime
    expires_at: datetime  # the payment deadline of the hold
    version: int
    kind: OrderKind
    team_id: str | None
    payment_ref: str | None

    @classmethod
    def from_record(cls, order_id: str, record: str, campaign_id: str | None = None) -> Order:
        """Decode the packed record of lua/lib/order.lua; ``campaign_id`` when the caller
        knows the order belongs to it (else it is parsed from the id)."""
        user, sku, qty, amount, state, created, deadline, version, kind, team, payref = (
            record.split("|")
        )
        return cls(
            order_id=order_id,
            campaign_id=campaign_id or campaign_of_order(order_id),
            user_id=user,
            sku=sku,
            qty=int(qty),
            amount=int(amount),
            state=_STATE_CODES[state],
            created_at=from_ms(int(created)),
            expires_at=from_ms(int(deadline)),
            version=int(version),
            kind=_KIND_CODES[kind],
            team_id=team or None,
            payment_ref=payref or None,
        )

    def record(self) -> str:
        """The packed record lua/lib/order.lua reads (the inverse of ``from_record``)."""
        return "|".join(
            (
                self.user_id,
                self.sku,
                str(self.qty),
                str(self.amount),
                _STATE_LETTERS[self.state],
                str(to_ms(self.created_at)),
                str(to_ms(self.expires_at)),
                str(self.version),
                _KIND_LETTERS[self.kind],
                self.team_id or "",
                self.payment_ref or "",
            )
        )


@dataclass(slots=True)  # not frozen: one per request (see engine.models.Order)
class Seat:
    """A taken seat of a team: the member's order (held or paid)."""

    order_id: str
    user_id: str


@dataclass(slots=True)  # not frozen: one per request (see engine.models.Order)
class Team:
    """A team (团单) as stored in Redis (lua/lib/team.lua)."""

    team_id: str
    campaign_id: str
    leader_id: str
    sku: str
    qty: int  # units per seat
    size: int
    state: TeamState
    created_at: datetime
    opened_at: datetime | None  # the leader's payment time
    expires_at: datetime | None  # opened_at + team_ttl_seconds
    held: int  # seats held, awaiting payment
    paid: int  # seats paid (for a failed team: paid, then refunded)
    version: int
    # How a team ended: failed (expired, invalidated), dissolved (leader_unpaid,
    # leader_cancelled), or succeeded automatically at expiry (AUTO_SUCCESS); else None.
    why: str | None
    seats: tuple[Seat, ...]  # leader first

    @property
    def auto_succeeded(self) -> bool:
        """Whether the team succeeded automatically: its time ran out with fewer than
        ``size`` paid seats, at least the campaign's ``auto_success_min_paid``."""
        return self.state is TeamState.SUCCEEDED and self.why == AUTO_SUCCESS

    @property
    def remaining(self) -> int:
        """Seats nobody holds or paid: what is left to fill."""
        return self.size - self.held - self.paid

    @classmethod
    def from_record(cls, team_id: str, record: str, campaign_id: str | None = None) -> Team:
        """Decode the packed record of lua/lib/team.lua; ``campaign_id`` when the caller
        knows the team belongs to it (else it is parsed from the id)."""
        (leader, sku, qty, size, state, created, opened, expires, held, paid, version, why,
         members) = record.split("|")  # fmt: skip
        seats = tuple(
            [Seat(*entry.split("=", 1)) for entry in members.split(",")] if members else ()
        )
        opened_ms, expires_ms = int(opened), int(expires)
        return cls(
            team_id=team_id,
            campaign_id=campaign_id or campaign_of_team(team_id),
            leader_id=leader,
            sku=sku,
            qty=int(qty),
            size=int(size),
            state=_TEAM_CODES[state],
            created_at=from_ms(int(created)),
            opened_at=from_ms(opened_ms) if opened_ms else None,
            expires_at=from_ms(expires_ms) if expires_ms else None,
            held=int(held),
            paid=int(paid),
            version=int(version),
            why=why or None,
            seats=seats,
        )

    def record(self) -> str:
        """The packed record lua/lib/team.lua reads (the inverse of ``from_record``)."""
        return "|".join(
            (
                self.leader_id,
                self.sku,
                str(self.qty),
                str(self.size),
                _TEAM_LETTERS[self.state],
                str(to_ms(self.created_at)),
                str(0 if self.opened_at is None else to_ms(self.opened_at)),
                str(0 if self.expires_at is None else to_ms(self.expires_at)),
                str(self.held),
                str(self.paid),
                str(self.version),
                self.why or "",
                ",".join(f"{seat.order_id}={seat.user_id}" for seat in self.seats),
            )
        )


@dataclass(slots=True)  # not frozen: one per request (see Order)
class Reservation:
    """A held flash order; ``replayed`` when an idempotent retry returned the original order."""

    order: Order
    replayed: bool


@dataclass(slots=True)  # not frozen: one per request (see Order)
class TeamSeatResult:
    """A held team order with its team; ``opened`` when the user leads a new team."""

    order: Order
    team: Team
    opened: bool
    replayed: bool
