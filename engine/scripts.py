"""The Lua scripts: loaded once at start-up, called through one typed wrapper each.

Each ``lua/*.lua`` file is one atomic operation. EVAL has no module system, so the libraries a
script names on its ``-- uses:`` header line (``lua/lib/*.lua``) are sent ahead of it. Every
wrapper method of ``Scripts`` owns its script's KEYS and ARGV order and decodes the reply into
the engine's types; a non-zero reply code leaves as the matching ``engine.errors.Rejected``
with its details. redis-py's ``AsyncScript`` does EVALSHA and, on NOSCRIPT (a Redis restart,
failover or SCRIPT FLUSH), loads the script and retries, so recovery needs no step. Redis
errors are translated here, and only here, into engine errors.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Final, TypeAlias, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from engine import errors
from engine.keys import keys_of, shard_of_order
from engine.models import Campaign, Order, Reservation, Team, TeamSeatResult, from_ms, to_ms
from engine.settings import Settings

_T = TypeVar("_T")
RedisClient: TypeAlias = aioredis.Redis | RedisCluster


class Code(IntEnum):
    """Outcome codes returned by every script (mirrors lua/lib/common.lua)."""

    OK = 0
    NOT_FOUND = 1
    NOT_STARTED = 2
    ENDED = 3
    INVALIDATED = 4
    SOLD_OUT = 5
    LIMIT_EXCEEDED = 6
    RATE_LIMITED = 7
    IDEMPOTENCY_MISMATCH = 8
    FORBIDDEN = 9
    HOLD_EXPIRED = 10
    INVALID_STATE = 11
    NOT_EDITABLE = 12
    TEAM_FULL = 13
    TEAM_CLOSED = 14
    ALREADY_IN_TEAM = 15
    TEAM_IN_PROGRESS = 16
    WRONG_KIND = 17
    RECOVERING = 18
    ORDER_LIMIT_EXCEEDED = 19
    PAYMENT_REF_USED = 20
    AMOUNT_MISMATCH = 21


_REJECTIONS: dict[Code, type[errors.EngineError]] = {
    Code.NOT_FOUND: errors.NotFound,
    Code.NOT_STARTED: errors.NotStarted,
    Code.ENDED: errors.Ended,
    Code.INVALIDATED: errors.Invalidated,
    Code.SOLD_OUT: errors.SoldOut,
    Code.LIMIT_EXCEEDED: errors.LimitExceeded,
    Code.RATE_LIMITED: errors.RateLimited,
    Code.IDEMPOTENCY_MISMATCH: errors.IdempotencyMismatch,
    Code.FORBIDDEN: errors.Forbidden,
    Code.HOLD_EXPIRED: errors.HoldExpired,
    Code.INVALID_STATE: errors.InvalidState,
    Code.NOT_EDITABLE: errors.NotEditable,
    Code.TEAM_FULL: errors.TeamFull,
    Code.TEAM_CLOSED: errors.TeamClosed,
    Code.ALREADY_IN_TEAM: errors.AlreadyInTeam,
    Code.TEAM_IN_PROGRESS: errors.TeamInProgress,
    Code.WRONG_KIND: errors.InvalidState,
    Code.RECOVERING: errors.Recovering,
    Code.ORDER_LIMIT_EXCEEDED: errors.OrderLimitExceeded,
    Code.PAYMENT_REF_USED: errors.PaymentRefUsed,
    Code.AMOUNT_MISMATCH: errors.AmountMismatch,
}


_MESSAGES = {
    Code.NOT_FOUND: "no such campaign, sku, order or team",
    Code.NOT_STARTED: "the campaign has not started yet",
    Code.ENDED: "the campaign has ended",
    Code.INVALIDATED: "the campaign was invalidated",
    Code.SOLD_OUT: "sold out",
    Code.LIMIT_EXCEEDED: "the per-user limit would be exceeded",
    Code.RATE_LIMITED: "too many attempts: retry after the given delay",
    Code.IDEMPOTENCY_MISMATCH: "this idempotency key was used with other parameters",
    Code.FORBIDDEN: "the order belongs to another user",
    Code.HOLD_EXPIRED: "the hold expired before payment: the payment must be refunded",
    Code.INVALID_STATE: "the order is not in a state that allows this",
    Code.NOT_EDITABLE: "the campaign can no longer be changed this way",
    Code.TEAM_FULL: "every seat of the team is taken",
    Code.TEAM_CLOSED: "the team is not open for joining or paying",
    Code.ALREADY_IN_TEAM: "the user already has a seat in this team",
    Code.TEAM_IN_PROGRESS: "a paid seat of a team in progress cannot be cancelled or refunded",
    Code.WRONG_KIND: "the campaign is of the other kind (flash or team)",
    Code.RECOVERING: "the campaign is being repaired after Redis lost writes: retry shortly",
    Code.ORDER_LIMIT_EXCEEDED: "more units than the campaign allows in one order",
    Code.PAYMENT_REF_USED: "this payment reference already paid another order",
    Code.AMOUNT_MISMATCH: "the amount paid is not what the order costs",
}
_ORDER_STATES = {"H": "held", "P": "paid", "C": "cancelled", "E": "expired", "R": "refunded"}
_TEAM_STATES = {"W": "pending", "O": "open", "S": "succeeded", "F": "failed", "D": "dissolved"}


def rejection(code: int, message: str, **details: Any) -> errors.EngineError:
    """The exception for a script's non-zero outcome code."""
    return _REJECTIONS[Code(code)](message, **details)


# A rejection's detail (the reply's second field) as the exception's keyword details.
_DETAILS: dict[Code, Callable[[Any], dict[str, Any]]] = {
    Code.NOT_STARTED: lambda extra: {"starts_at": from_ms(int(extra))},
    Code.ENDED: lambda extra: {"ends_at": from_ms(int(extra))},
    Code.RATE_LIMITED: lambda extra: {"retry_after": int(extra) / 1000},
    Code.SOLD_OUT: lambda extra: {"available": int(extra)},
    Code.LIMIT_EXCEEDED: lambda extra: {"units_left": int(extra)},
    Code.INVALID_STATE: lambda extra: {"state": _ORDER_STATES.get(extra, extra)},
    Code.TEAM_CLOSED: lambda extra: {"team_state": _TEAM_STATES.get(extra, extra)},
    Code.NOT_FOUND: lambda extra: {"sku": extra},
    Code.RECOVERING: lambda extra: {"why": extra},
    Code.ORDER_LIMIT_EXCEEDED: lambda extra: {"per_order_limit": int(extra)},
    Code.AMOUNT_MISMATCH: lambda extra: {"amount": int(extra)},
}


def _details(code: Code, extra: Any) -> dict[str, Any]:
    details = _DETAILS.get(code)
    return {} if extra is None or details is None else details(extra)


def _extra(reply: list[Any]) -> Any:
    """A rejection's detail (the reply's second field), None when it has none."""
    return reply[1] if len(reply) > 1 else None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A rejected request as a value: its code and detail. A batch answers many callers, and
    each raises its own ``error()`` where it waits: an exception kept in a future or a local
    would tie itself to its traceback's frames (a reference cycle for every rejection, which
    is most of a sold-out storm)."""

    code: Code
    detail: Any

    @classmethod
    def of(cls, reply: list[Any]) -> Refusal:
        """The refusal of a non-zero reply."""
        return cls(Code(reply[0]), _extra(reply))

    def error(self) -> errors.EngineError:
        """The exception to raise, with its details (``starts_at``, ``retry_after``,
        ``available``, ...)."""
        return rejection(self.code, _MESSAGES[self.code], **_details(self.code, self.detail))


def is_ok(reply: list[Any]) -> bool:
    """Whether one script reply (or one request's reply in a batch) carries code OK."""
    return bool(reply[0] == Code.OK)


def _order(order_id: str, reply: list[Any], campaign_id: str) -> Order:
    """The order a pay, cancel or refund script answered; its refusal raised (NOT_FOUND: the
    campaign does not hold that order)."""
    if reply[0] == Code.NOT_FOUND:
        raise errors.OrderNotFound(order_id)
    if reply[0] != Code.OK:
        raise Refusal.of(reply).error()
    return Order.from_record(reply[1], reply[2], campaign_id)


def _reservation(reply: list[Any], campaign_id: str) -> Reservation:
    """``{0, order_id, record, replayed}`` of a reservation."""
    return Reservation(Order.from_record(reply[1], reply[2], campaign_id), reply[3] == 1)


def _seat(reply: list[Any], campaign_id: str) -> TeamSeatResult:
    """``{0, order_id, record, replayed, team_id, team_record, opened}`` of a team order."""
    return TeamSeatResult(
        order=Order.from_record(reply[1], reply[2], campaign_id),
        team=Team.from_record(reply[4], reply[5], campaign_id),
        opened=reply[6] == 1,
        replayed=reply[3] == 1,
    )


def decode(call: Call, reply: list[Any], campaign_id: str) -> Outcome:
    """One request's reply (from ``Scripts.send``) decoded for its op: the value, or its
    Refusal."""
    if reply[0] != Code.OK:
        return Refusal.of(reply)
    if call.op in (RESERVE, PROBE):
        return _reservation(reply, campaign_id)
    return _seat(reply, campaign_id)


def accepted(outcome: _T | Refusal) -> _T:
    """``outcome`` unless it is a Refusal, which is raised (built here, so no frame keeps the
    exception: see Refusal)."""
    if isinstance(outcome, Refusal):
        raise outcome.error()
    return outcome


# The ops of batch.lua (and of its one-call scripts): reserve, sold-out probe, join, quick-join;
# OPEN (open a team) runs through open_team.lua only.
RESERVE: Final = "r"
PROBE: Final = "p"
JOIN: Final = "j"
QUICK: Final = "q"
OPEN: Final = "o"
_SCRIPT_OF = {RESERVE: "reserve_stock", OPEN: "open_team", JOIN: "join_team", QUICK: "quick_join"}


@dataclass(slots=True)  # not frozen: one per request (see engine.models.Order)
class Call:
    """One order-creating request: an op and its fields, in the one order every script and
    lib/ops.lua use (user, sku or team, qty, idempotency key). ``team_id`` is for JOIN only,
    ``sku`` and ``qty`` for the others (``qty`` 0 for QUICK: one unit per seat)."""

    op: str
    user_id: str
    sku: str
    team_id: str
    qty: int
    idempotency_key: str

    def args(self) -> tuple[str, str, str, str]:
        """The request's ARGV of its one-call script: user, sku or team, qty, key."""
        target = self.team_id if self.op == JOIN else self.sku
        return (self.user_id, target, str(self.qty) if self.qty else "", self.idempotency_key)

    def fields(self) -> str:
        """The request packed as batch.lua reads it: ``op|user|sku-or-team|qty|key``."""
        return "|".join((self.op, *self.args()))


# Index entries quick-join looks at before it opens a new team (skipping the user's own teams).
QUICK_JOIN_SCAN = 64


@dataclass(frozen=True, slots=True)
class OrderArgs:
    """What every order-creating script takes ahead of its requests (lib/ops.lua): attempts
    per user and second (0 = off), the idempotency TTL (s), the quick-join scan bound."""

    rate_limit: int
    idempotency_ttl: int
    quick_scan: int = QUICK_JOIN_SCAN

    @classmethod
    def of(cls, settings: Settings) -> OrderArgs:
        """The arguments ``settings`` give."""
        return cls(settings.rate_limit, settings.idempotency_ttl)

    def one(self, campaign_id: str, call: Call) -> tuple[str | int, ...]:
        """ARGV of reserve_stock, open_team, join_team or quick_join for one request."""
        return (campaign_id, self.rate_limit, self.idempotency_ttl, self.quick_scan, *call.args())

    def batch(self, campaign_id: str, calls: Sequence[Call]) -> tuple[str | int, ...]:
        """ARGV of batch.lua: every request's fields in one argument (one string to pack
        instead of 5 per request)."""
        packed = "|".join([call.fields() for call in calls])
        return (campaign_id, self.rate_limit, self.idempotency_ttl, self.quick_scan, packed)


Outcome: TypeAlias = Reservation | TeamSeatResult | Refusal


@dataclass(frozen=True, slots=True)
class ExpiryStep:
    """One reaper step (expire_orders.lua, expire_teams.lua): how many orders or teams it
    ended, and ``upcoming``: the earliest remaining deadline in ms, MORE_DUE, OVER, or -1 when
    nothing is held (orders) or open (teams)."""

    ended: int
    upcoming: int

    MORE_DUE: ClassVar[int] = 0  # more are due at once: call again
    OVER: ClassVar[int] = -2  # orders only: nothing can ever be due again in this campaign

    @property
    def more_due(self) -> bool:
        """Whether more are due at once."""
        return self.upcoming == self.MORE_DUE

    @property
    def over(self) -> bool:
        """Whether the campaign can hold nothing any more (the reaper may forget it)."""
        return self.upcoming == self.OVER


def _expiry(reply: list[Any]) -> ExpiryStep:
    """A reaper script's reply; Recovering when the campaign awaits a repair ({-1, why})."""
    if int(reply[0]) < 0:
        raise errors.Recovering(_MESSAGES[Code.RECOVERING], why=reply[1])
    return ExpiryStep(int(reply[0]), int(reply[1]))


def _lua_dir() -> Path:
    """``engine/lua`` inside a wheel; the repository's ``lua/`` in a source checkout."""
    packaged = Path(str(resources.files("engine"))) / "lua"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "lua"


_USES = re.compile(r"^-- uses:(.*)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Units of one item on their way between two stock buckets of a sharded campaign
    (lua/transfer_stock.lua): debited from ``source``, credited to ``destination`` once."""

    xid: str
    source: str  # shard ids
    destination: str
    sku: str
    units: int
    epoch: str  # the repair generation it was debited in

    @classmethod
    def of(cls, source: str, xid: str, record: str) -> Transfer:
        """A pending record read at its source: ``destination|sku|units|epoch|ms``."""
        destination, sku, units, epoch, _ = record.split("|")
        return cls(xid, source, destination, sku, int(units), epoch)


@dataclass(frozen=True, slots=True)
class Peek:
    """One stock bucket as ``peek`` read it, in one atomic step."""

    shard: str
    available: int  # of the sku asked about; -1 when the bucket has no such sku
    credits: int  # transfers credited to it so far (a counter)
    epoch: str
    pending: tuple[Transfer, ...]  # transfers out of it not settled yet


def script_source(name: str) -> str:
    """The text sent to Redis for ``lua/<name>.lua``: the libraries its ``-- uses:`` line
    names, in that order, then the script."""
    lua = _lua_dir()
    text = (lua / f"{name}.lua").read_text()
    uses = _USES.search(text)
    libraries = uses.group(1).split() if uses else []
    return "\n".join([*((lua / library).read_text() for library in libraries), text])


class Scripts:
    """Every script of ``lua/``, registered on one client, behind one typed method each.

    ``order_args``: the settings every order-creating script takes (lib/ops.lua).
    """

    NAMES = (
        "reserve_stock",
        "pay_order",
        "cancel_order",
        "refund_order",
        "expire_orders",
        "warm_campaign",
        "invalidate_campaign",
        "open_team",
        "join_team",
        "quick_join",
        "expire_teams",
        "list_teams",
        "ack_events",
        "forget_consumers",
        "batch",
        "recover_campaign",
        "archive_campaign",
        "transfer_stock",
    )

    def __init__(
        self,
        client: RedisClient,
        order_args: OrderArgs,
        max_in_flight: int = 256,
    ) -> None:
        self._client = client
        self._sources = {name: script_source(name) for name in self.NAMES}
        self._limit = asyncio.Semaphore(max_in_flight)
        # Called with (script name, seconds) after every call when set (the API's metrics).
        self.observe: Callable[[str, float], None] | None = None
        self.loaded = False  # every script was sent to Redis once (load)
        # Awaited with (campaign id, why) when a script finds the campaign's Redis state
        # untrusted (lib/common.lua untrusted), before the caller gets Recovering: the
        # engine's recovery (engine/recovery.py) schedules the repair, or raises NotFound
        # for a campaign SQL does not have either. True when the state is trusted again
        # (verified on a new server): the script is called once more.
        self.untrusted: Callable[[str, str], Awaitable[bool]] | None = None
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source) for name, source in self._sources.items()
        }
        self._args = order_args

    def sha(self, name: str) -> str:
        """The SHA1 of one script as Redis knows it (``name`` as in NAMES)."""
        return str(self._scripts[name].sha)

    async def load(self) -> None:
        """SCRIPT LOAD every script (on every primary of a cluster) so the first call is warm."""
        for source in self._sources.values():
            await guarded(self._client.script_load(source))
        self.loaded = True

    async def _call(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[str | int],
        campaign_id: str | None = None,
        refused: int = Code.RECOVERING,
    ) -> list[Any]:
        """Call one script of ``campaign_id``; Redis failures become engine errors, the reply
        a list. A reply saying the campaign awaits a repair (first field ``refused``: 18, or
        -1 from the reaper's scripts, whose replies start with a count) is reported to
        ``untrusted`` first; when that finds the state trusted again, the script is called
        once more."""
        reply = await self._once(name, keys, args)
        untrusted = bool(reply) and reply[0] == refused
        if (
            untrusted
            and campaign_id is not None
            and self.untrusted is not None
            and await self.untrusted(campaign_id, str(reply[1]))
        ):
            return await self._once(name, keys, args)
        return reply

    async def _once(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> list[Any]:
        script = self._scripts[name]
        async with self._limit:
            if self.observe is None:
                reply = await guarded(script(keys=keys, args=args))
            else:
                started = time.perf_counter()
                try:
                    reply = await guarded(script(keys=keys, args=args))
                finally:
                    self.observe(name, time.perf_counter() - started)
        if not isinstance(reply, list):
            raise errors.EngineError(f"script returned {type(reply).__name__}, not a list")
        return reply

    # The order-creating scripts (lib/ops.lua).

    async def _create(self, name: str, shard: str, call: Call) -> list[Any]:
        keys = keys_of(shard)
        keys_one = keys.limited_keys if self._args.rate_limit else keys.order_keys
        return await self._call(name, keys_one, self._args.one(shard, call), keys.campaign_id)

    async def one(self, shard: str, call: Call) -> Outcome:
        """One request of any op (OPEN included): its value, or its Refusal (returned, not
        raised). ``shard``: the campaign id, or the shard id of one stock bucket of a sharded
        campaign (engine/shards.py), whose orders are numbered ``<shard>.o<n>``."""
        (reply,) = await self.send(shard, [call])
        return decode(call, reply, keys_of(shard).campaign_id)

    async def send(self, shard: str, calls: Sequence[Call]) -> list[list[Any]]:
        """RESERVE, PROBE, JOIN and QUICK requests of one campaign (or of one stock bucket of
        a sharded one: its shard id): one through its own script (a PROBE, which has none,
        through batch.lua), more through batch.lua in one call, in order. One reply per
        request, for ``decode`` where its caller waits: decoding a batch's records here at
        once would keep them all alive together (garbage-collector work on every batch)."""
        if len(calls) == 1 and calls[0].op != PROBE:
            call = calls[0]
            return [await self._create(_SCRIPT_OF[call.op], shard, call)]
        keys = keys_of(shard)
        # the rate limit's two windows after the order keys; none when it is off
        batch_keys = keys.limited_keys if self._args.rate_limit > 0 else keys.order_keys
        reply = await self._call(
            "batch", batch_keys, self._args.batch(shard, calls), keys.campaign_id
        )
        if reply and reply[0] == Code.RECOVERING:  # the whole campaign refused: each request
            return [reply] * len(calls)
        return reply

    # Orders of every kind.

    async def pay(
        self, order_id: str, user_id: str, payment_ref: str, amount: int | None = None
    ) -> Order:
        """pay_order.lua: the held order paid (its team opened or succeeded); ``amount``, when
        given, must be the order's."""
        keys = keys_of(shard_of_order(order_id))
        args = (
            order_id,
            user_id,
            payment_ref,
            "" if amount is None else amount,
            self._args.idempotency_ttl,
        )
        reply = await self._call("pay_order", keys.order_keys, args, keys.campaign_id)
        return _order(order_id, reply, keys.campaign_id)

    async def cancel(self, order_id: str, user_id: str) -> Order:
        """cancel_order.lua: the held order cancelled by its owner, its seat freed."""
        keys = keys_of(shard_of_order(order_id))
        reply = await self._call(
            "cancel_order", keys.order_keys, (order_id, user_id), keys.campaign_id
        )
        return _order(order_id, reply, keys.campaign_id)

    async def refund(self, order_id: str, restock: bool) -> Order:
        """refund_order.lua: the paid order refunded; units back on sale if ``restock``."""
        keys = keys_of(shard_of_order(order_id))
        reply = await self._call(
            "refund_order", keys.order_keys, (order_id, int(restock)), keys.campaign_id
        )
        return _order(order_id, reply, keys.campaign_id)

    # The reaper.

    async def expire_orders(self, shard: str, limit: int) -> ExpiryStep:
        """expire_orders.lua: end up to ``limit`` held orders past their deadline (of one
        stock bucket of a sharded campaign: its shard id)."""
        keys = keys_of(shard)
        reply = await self._call(
            "expire_orders", keys.order_keys, (limit,), keys.campaign_id, refused=-1
        )
        return _expiry(reply)

    async def expire_teams(self, campaign_id: str, limit: int) -> ExpiryStep:
        """expire_teams.lua: fail up to ``limit`` open teams past their expiry."""
        keys = keys_of(campaign_id).order_keys
        return _expiry(await self._call("expire_teams", keys, (limit,), campaign_id, refused=-1))

    # Campaigns.

    async def define(
        self, campaign: Campaign, *, only_if_absent: bool = False, index: int = 0
    ) -> bool:
        """warm_campaign.lua 'define' (or 'ensure' when ``only_if_absent``): load the
        definition and stock into Redis; False when 'ensure' found it there already. Of
        stock bucket ``index`` for a sharded campaign: its share of every item's stock."""
        keys = keys_of(campaign.shard_ids[index])
        invalidated = campaign.invalidated_at
        args: list[str | int] = [
            "ensure" if only_if_absent else "define",
            campaign.kind.value,
            to_ms(campaign.starts_at),
            to_ms(campaign.ends_at),
            campaign.per_user_limit,
            campaign.hold_seconds * 1000,
            campaign.team_size or 0,
            (campaign.team_ttl_seconds or 0) * 1000,
            0 if invalidated is None else to_ms(invalidated),
            campaign.per_order_limit or 0,
            campaign.auto_success_min_paid or 0,
            campaign.quick_join_min_ms,
        ]
        for item in campaign.items:
            leader = "" if item.leader_price is None else item.leader_price
            args += [item.sku, item.price, campaign.bucket_stock(item, index), leader]
        reply = await self._call("warm_campaign", (keys.meta, keys.inv), args, campaign.id)
        if reply[0] == Code.RECOVERING:
            raise Refusal.of(reply).error()
        if reply[0] != Code.OK:
            raise rejection(
                reply[0], f"campaign {campaign.id} can no longer be redefined: {_extra(reply)}"
            )
        return bool(reply[1] == 1)

    async def extend(self, shard: str, ends_at: datetime) -> None:
        """warm_campaign.lua 'extend': move the running campaign's end later (in one stock
        bucket of a sharded campaign: its shard id)."""
        keys = keys_of(shard)
        args: list[str | int] = ["extend", to_ms(ends_at)]
        reply = await self._call("warm_campaign", (keys.meta, keys.inv), args, keys.campaign_id)
        if reply[0] == Code.RECOVERING:
            raise Refusal.of(reply).error()
        if reply[0] != Code.OK:
            reason = _extra(reply)
            raise rejection(reply[0], f"ends_at can only move later ({reason})", reason=reason)

    async def invalidate(self, shard: str) -> datetime:
        """invalidate_campaign.lua: no new orders from now; returns when it was invalidated
        (the first time, on a retry). One stock bucket of a sharded campaign: its shard id."""
        keys = keys_of(shard)
        campaign_id = keys.campaign_id
        reply = await self._call("invalidate_campaign", (keys.meta, keys.events), (), campaign_id)
        if reply[0] == Code.RECOVERING:
            raise Refusal.of(reply).error()
        if reply[0] != Code.OK:
            raise errors.NotEditable(f"campaign {campaign_id} already ended", reason=_extra(reply))
        return from_ms(int(reply[1]))

    # Teams and the outbox.

    async def list_teams(
        self, campaign_id: str, sku: str, viewer: str | None, limit: int
    ) -> list[Team]:
        """list_teams.lua: up to ``limit`` joinable teams of the sku, without the viewer's."""
        keys = keys_of(campaign_id)
        reply = await self._call("list_teams", keys.order_keys, (sku, viewer or "", limit))
        if not reply:
            raise errors.NotFound(f"no campaign {campaign_id}", id=campaign_id)
        return [Team.from_record(reply[i], reply[i + 1]) for i in range(1, len(reply), 2)]

    # Recovery (engine/recovery.py).

    async def report_untrusted(self, shard: str, why: str) -> None:
        """Fence the campaign (or the stock bucket ``shard`` of a sharded one) and tell
        ``untrusted``: another part of the engine (the flush worker) found that Redis lost
        writes of it."""
        await self.fence(shard, why)
        if self.untrusted is not None:
            await self.untrusted(keys_of(shard).campaign_id, why)

    async def fence(self, shard: str, why: str) -> None:
        """recover_campaign.lua 'fence': the campaign's (or the bucket's) operations answer
        recovering."""
        keys = keys_of(shard)
        await self._call("recover_campaign", (keys.meta, keys.repair), ("fence", why))

    async def take_repair(self, shard: str, token: str, ms: int) -> str | None:
        """recover_campaign.lua 'take': hold the repair lock ``ms`` longer; None when taken,
        else the token of the process holding it. A sharded campaign's repair takes the lock
        of every bucket it rebuilds."""
        keys = keys_of(shard)
        reply = await self._call("recover_campaign", (keys.meta, keys.repair), ("take", token, ms))
        return None if reply[0] == Code.OK else str(reply[1])

    # Archival (engine/archive.py).

    async def seal(self, shard: str) -> str | None:
        """archive_campaign.lua 'seal': from now on the campaign (or this stock bucket of a
        sharded one) never changes in Redis; None when sealed (now or before), else why not
        ('live', 'holds', 'teams', 'unflushed', 'transfers', 'missing', or a reason it awaits
        a repair)."""
        keys = keys_of(shard)
        reply = await self._call(
            "archive_campaign",
            (keys.meta, keys.deadlines, keys.team_expiry, keys.events, keys.transfers),
            ("seal",),
        )
        if reply[0] == Code.OK:
            return None
        return "missing" if reply[0] == Code.NOT_FOUND else str(reply[1])

    async def unseal(self, shard: str) -> None:
        """archive_campaign.lua 'unseal': the archival is called off, the campaign is live."""
        keys = keys_of(shard)
        await self._call(
            "archive_campaign",
            (keys.meta, keys.deadlines, keys.team_expiry, keys.events, keys.transfers),
            ("unseal",),
        )

    async def lift(self, shard: str, token: str, gap: int = 0) -> bool:
        """recover_campaign.lua 'lift': the repaired (or verified) state is trusted on this
        server, its sequences moved on by ``gap``; False when the lock is no longer this
        token's (the repair took too long: redo it)."""
        keys = keys_of(shard)
        args = ("lift", token, gap)
        reply = await self._call("recover_campaign", (keys.meta, keys.repair), args)
        return bool(reply[0] == Code.OK)

    async def free(self, shard: str, token: str) -> None:
        """recover_campaign.lua 'free': give the repair lock up, changing nothing else."""
        keys = keys_of(shard)
        await self._call("recover_campaign", (keys.meta, keys.repair), ("free", token))

    # Stock transfers between the buckets of a sharded campaign (engine/shards.py).

    async def peek(self, shard: str, sku: str) -> Peek:
        """transfer_stock.lua 'peek': one bucket's available units of ``sku``, the credits it
        received so far, and its pending transfers out."""
        keys = keys_of(shard)
        reply = await self._call(
            "transfer_stock", (keys.meta, keys.inv, keys.transfers), ("peek", sku), keys.campaign_id
        )
        if reply[0] != Code.OK:
            raise Refusal.of(reply).error()
        pending = tuple(Transfer.of(shard, reply[i], reply[i + 1]) for i in range(4, len(reply), 2))
        return Peek(shard, int(reply[1]), int(reply[2]), str(reply[3]), pending)

    async def debit(
        self, source: str, sku: str, most: int, least: int, destination: str
    ) -> Transfer | None:
        """transfer_stock.lua 'debit': take up to ``most`` (at least ``least``) available units
        of ``sku`` out of ``source`` for ``destination``; None when it has too few or the sale
        is not on."""
        keys = keys_of(source)
        reply = await self._call(
            "transfer_stock",
            (keys.meta, keys.inv, keys.transfers),
            ("debit", sku, most, least, destination, source),
            keys.campaign_id,
        )
        if reply[0] == Code.RECOVERING:
            raise Refusal.of(reply).error()
        if reply[0] != Code.OK:
            return None
        return Transfer(str(reply[1]), source, destination, sku, int(reply[2]), str(reply[3]))

    async def credit(self, transfer: Transfer) -> bool:
        """transfer_stock.lua 'credit': the units on sale in the destination, once however
        often it is called; False when the transfer is void (debited before a repair)."""
        keys = keys_of(transfer.destination)
        reply = await self._call(
            "transfer_stock",
            (keys.meta, keys.inv, keys.credits),
            ("credit", transfer.xid, transfer.sku, transfer.units, transfer.epoch),
            keys.campaign_id,
        )
        if reply[0] == Code.RECOVERING:
            raise Refusal.of(reply).error()
        return bool(reply[0] == Code.OK)

    async def settle(self, transfer: Transfer) -> None:
        """transfer_stock.lua 'settle': forget the pending record at the source (only once
        ``credit`` answered)."""
        keys = keys_of(transfer.source)
        await self._call("transfer_stock", (keys.transfers,), ("settle", transfer.xid))

    async def ack_events(self, stream: str, group: str, entry_ids: Sequence[str]) -> int:
        """ack_events.lua: acknowledge and delete flushed outbox entries; how many were."""
        reply = await self._call("ack_events", (stream,), (group, *entry_ids))
        return int(reply[0])

    async def forget_consumers(
        self, stream: str, group: str, idle_ms: int, names: Sequence[str] = ()
    ) -> int:
        """forget_consumers.lua: remove the group's consumers with nothing pending that are
        idle longer than ``idle_ms`` or named in ``names``; how many were."""
        reply = await self._call("forget_consumers", (stream,), (group, idle_ms, *names))
        return int(reply[0])


async def guarded(awaitable: Any) -> Any:
    """Await a Redis call, translating Redis failures into engine errors (the one boundary)."""
    try:
        return await awaitable
    except (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.BusyLoadingError,
        redis_errors.ClusterDownError,
        redis_errors.TryAgainError,
        redis_errors.MaxConnectionsError,
        redis_errors.SlotNotCoveredError,  # a Cluster slot with no live owner, mid-failover
        OSError,
    ) as exc:
        raise errors.Unavailable(f"Redis is unavailable: {exc}", service="redis") from exc
    except redis_errors.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise errors.Unavailable(
                "Redis is out of memory (maxmemory reached)", service="redis"
            ) from exc
        raise errors.EngineError(f"Redis rejected a command: {exc}") from exc
