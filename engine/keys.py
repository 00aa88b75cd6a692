"""Redis key schema and the id rules that keep user input out of key names.

Every key of a campaign shares the hash tag ``{c:<campaign_id>}`` so that each script touches
one Redis Cluster slot. Scripts never build key names: the caller passes them all in KEYS.

    ft:{c:<cid>}:meta        hash    definition and status flags the scripts check
    ft:{c:<cid>}:inv         hash    per sku: ``a:<sku>`` available, ``h:<sku>`` held units,
                                     ``p:<sku>`` paid units, ``r:<sku>`` refunded without restock,
                                     ``i:<sku>`` initial stock, ``$:<sku>`` unit price
    ft:{c:<cid>}:orders      hash    order id -> packed order record (see lua/lib/order.lua)
    ft:{c:<cid>}:users       hash    user id -> held + paid units (the per-user limit)
    ft:{c:<cid>}:deadlines   zset    held order id -> payment deadline (ms); the reaper's index
    ft:{c:<cid>}:events      stream  the outbox: one entry per state change (engine.events)
    ft:{c:<cid>}:teams       hash    team id -> packed team record (see lua/lib/team.lua)
    ft:{c:<cid>}:joinable    zset    open teams with a free seat, ordered per sku by remaining
                                     seats then expiry (lexicographic members, scores 0)
    ft:{c:<cid>}:team_deadlines zset open team id -> expires_at (ms); the reaper's team index
    ft:{c:<cid>}:idem        hash    idempotency records: ``<user>:<key>`` -> ``<op><order seq>``
                                     (lua/lib/ops.lua), and ``:<payment ref>`` -> ``p<order
                                     seq>``, the order a reference paid (lua/pay_order.lua);
                                     the hash expires 24 h after its last write, so every
                                     record lives at least 24 h
    ft:{c:<cid>}:rl:0, :rl:1 hash    the rate limit's windows, even and odd seconds: user id ->
                                     attempts that second, ':s' -> the second (lib/ops.lua)
    ft:{c:<cid>}:repair      string  the repair lock: the token of the process repairing
                                     the campaign from SQL (engine/recovery.py)
    ft:{c:<cid>}:transfers   hash    a sharded campaign's stock transfers out of this bucket
                                     not yet settled (lua/transfer_stock.lua)
    ft:{c:<cid>}:credits     hash    the transfers this bucket was credited (never twice)
    ft:campaigns             set     campaigns that may still hold orders or teams (the reaper's)
    ft:streams               set     campaigns whose outbox may hold unflushed events (the
                                     flush worker's); both found without KEYS scans
    ft:dead                  stream  dead letters: outbox entries the worker could not decode

Order ids are ``<cid>.o<n>`` and team ids ``<cid>.t<n>``: the campaign (and so the slot) is
derivable from the id alone.

A sharded flash campaign (``shards: N``, engine/shards.py) keeps its hot state in N buckets,
each a whole key space of the list above under its own hash tag: bucket 0 is ``{c:<cid>}``
(so one bucket is exactly the unsharded layout), bucket ``k`` is ``{c:<cid>:<k>}``, its numbers
chosen at creation so the N slots land on different masters. A bucket is named by its *shard
id*: ``<cid>`` for bucket 0, ``<cid>.b<k>`` for bucket ``k`` (a campaign id has no ``.``);
its orders are ``<shard>.o<n>``, so an order id names its bucket and its slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from engine.errors import ValidationError

ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
KEY_PATTERN: Final = r"[A-Za-z0-9_.:-]{1,128}"
_ID = re.compile(ID_PATTERN)
_KEY = re.compile(KEY_PATTERN)
# A shard id: the campaign, then the bucket number unless it is 0 (engine/shards.py).
SHARD_PATTERN: Final = rf"({ID_PATTERN})(?:\.b([1-9][0-9]{{0,3}}))?"
MAX_BUCKET: Final = 9_999
_SHARD = re.compile(SHARD_PATTERN)
_ORDER_ID = re.compile(rf"{SHARD_PATTERN}\.o([0-9]{{1,18}})")
_TEAM_ID = re.compile(rf"({ID_PATTERN})\.t([0-9]{{1,18}})")

CAMPAIGN_SET: Final = "ft:campaigns"
STREAM_SET: Final = "ft:streams"
DEAD_LETTERS: Final = "ft:dead"


def check_id(value: str, field: str) -> str:
    """Return ``value`` if it is a valid campaign, sku or user id, else raise ValidationError."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValidationError(f"{field} must match {ID_PATTERN}", field=field)
    return value


def check_key(value: str, field: str) -> str:
    """Return ``value`` if it is a valid idempotency key or payment reference."""
    if not isinstance(value, str) or not _KEY.fullmatch(value):
        raise ValidationError(f"{field} must match {KEY_PATTERN}", field=field)
    return value


def _order_match(order_id: str) -> re.Match[str]:
    match = _ORDER_ID.fullmatch(order_id) if isinstance(order_id, str) else None
    if match is None:
        raise ValidationError(
            "order_id must look like <campaign>.o<number> or <campaign>.b<bucket>.o<number>",
            field="order_id",
        )
    return match


def campaign_of_order(order_id: str) -> str:
    """The campaign id embedded in an order id; ValidationError if it is not an order id."""
    return _order_match(order_id).group(1)


def parse_order(order_id: str) -> tuple[str, int, int]:
    """(campaign id, bucket number, order number) of an order id; ValidationError if it is
    not one. Whether the campaign has that bucket and issued that number is the caller's
    question (engine/orders.py)."""
    match = _order_match(order_id)
    return match.group(1), int(match.group(2) or 0), int(match.group(3))


def shard_of_order(order_id: str) -> str:
    """The shard id (``<campaign>`` or ``<campaign>.b<k>``) of the bucket holding the order."""
    _order_match(order_id)
    return order_id[: order_id.rindex(".")]


def shard_id(campaign_id: str, bucket: int) -> str:
    """The shard id of bucket number ``bucket`` of the campaign (0: the campaign id itself)."""
    return campaign_id if bucket == 0 else f"{campaign_id}.b{bucket}"


def split_shard(shard: str) -> tuple[str, int]:
    """(campaign id, bucket number) of a shard id; ValidationError if it is none."""
    match = _SHARD.fullmatch(shard) if isinstance(shard, str) else None
    if match is None:
        raise ValidationError(f"campaign_id must match {ID_PATTERN}", field="campaign_id")
    return match.group(1), int(match.group(2) or 0)


def campaign_of_team(team_id: str) -> str:
    """The campaign id embedded in a team id; ValidationError if it is not a team id."""
    match = _TEAM_ID.fullmatch(team_id) if isinstance(team_id, str) else None
    if match is None:
        raise ValidationError("team_id must look like <campaign>.t<number>", field="team_id")
    return match.group(1)


@dataclass(frozen=True, slots=True)
class CampaignKeys:
    """The key names of one campaign, or of one bucket of a sharded campaign (``shard``: the
    shard id; the campaign id itself for bucket 0, the unsharded layout)."""

    campaign_id: str
    meta: str
    inv: str
    orders: str
    users: str
    deadlines: str
    events: str
    teams: str
    team_index: str
    team_expiry: str
    idem: str  # hash: idempotency records (idempotency_field -> record)
    rejections: str  # hash: rejections per error code, counted by the API (KPIs)
    rate_windows: tuple[str, str]  # hashes: attempts per user in even and odd seconds
    repair: str  # string: the repair lock (engine/recovery.py)
    order_keys: tuple[
        str, ...
    ]  # KEYS of every order and team script (lua/lib/common.lua order_keys)
    limited_keys: tuple[str, ...]  # order_keys, then rate_windows: with the rate limit on
    shard: str  # the shard id: campaign_id, or "<campaign_id>.b<bucket>" (engine/shards.py)
    tag: str  # "ft:{c:<campaign_id>}" or "ft:{c:<campaign_id>:<bucket>}"
    transfers: str  # hash: stock transfers out of this bucket, not settled (sharded only)
    credits: str  # hash: transfers credited to this bucket (sharded only)

    @classmethod
    def of(cls, shard: str) -> CampaignKeys:
        """The keys of a campaign (its id) or of one of its buckets (a shard id)."""
        campaign_id, bucket = split_shard(shard)
        tag = f"ft:{{c:{campaign_id}}}" if bucket == 0 else f"ft:{{c:{campaign_id}:{bucket}}}"
        meta, inv, orders, users, deadlines, events = (
            f"{tag}:{name}" for name in ("meta", "inv", "orders", "users", "deadlines", "events")
        )
        order_keys = (
            meta,
            inv,
            orders,
            users,
            deadlines,
            events,
            f"{tag}:teams",
            f"{tag}:joinable",
            f"{tag}:team_deadlines",
            f"{tag}:idem",
        )
        rate_windows = (f"{tag}:rl:0", f"{tag}:rl:1")
        return cls(
            campaign_id=campaign_id,
            meta=meta,
            inv=inv,
            orders=orders,
            users=users,
            deadlines=deadlines,
            events=events,
            teams=f"{tag}:teams",
            team_index=f"{tag}:joinable",
            team_expiry=f"{tag}:team_deadlines",
            idem=f"{tag}:idem",
            rejections=f"{tag}:rejections",
            rate_windows=rate_windows,
            repair=f"{tag}:repair",
            order_keys=order_keys,
            limited_keys=order_keys + rate_windows,
            shard=shard,
            tag=tag,
            transfers=f"{tag}:transfers",
            credits=f"{tag}:credits",
        )


def idempotency_field(user_id: str, key: str) -> str:
    """The field of one idempotency record in the campaign's ``idem`` hash (both parts already
    validated: a user id has no ``:``, so the field names one (user, key) pair)."""
    return f"{user_id}:{key}"


@lru_cache(maxsize=4096)
def keys_of(shard: str) -> CampaignKeys:
    """CampaignKeys.of, cached: the hot path builds no key strings for a known campaign (or
    bucket)."""
    return CampaignKeys.of(shard)
