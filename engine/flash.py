"""Flash-sale reservations: hold units of one item for a shopper until the hold deadline.

A reservation is one Lua script call, coalesced per campaign (``engine.coalesce``); it leaves
here as a ``Reservation`` or a ``Rejected`` subclass (decoded by ``engine.scripts``). Paying,
cancelling and refunding the order is ``engine.orders``'s (for every kind of order).

The sold-out fast path: once a reservation finds an item with no units left, this process
sends further reservations of that item as probes for ``settings.sold_out_ttl`` seconds (0.5
s by default; never more than 1 s): they ride in a coalesced batch, and each costs one HGET of
its idempotency record and one read of the item's units (shared by the batch). A retry of a
reservation that did succeed gets its order back, the others ``sold_out`` while no unit is
left; a unit returned by an expiry or a cancel is reserved at once. So every process, flag or
no flag, gives a request the same answer: a retry sent to another node never reads
``sold_out`` beside an order.

A sharded campaign (engine/shards.py) sends each shopper's reservation to the shopper's stock
bucket; when that bucket cannot serve it, the rebalancer moves units there from the other
buckets and the reservation runs again, until it is served or the whole item is sold out.
"""

from __future__ import annotations

import time

from engine.archive import archived_refusal
from engine.coalesce import Coalescer
from engine.errors import Archived
from engine.keys import check_id, check_key, keys_of
from engine.models import MAX_UNITS, Reservation, check_int
from engine.runtime import Runtime
from engine.scripts import Code, Refusal
from engine.shards import ROUNDS, Layout, Rebalancer


class FlashSale:
    """The flash-sale path (docs/lifecycle.md#order)."""

    def __init__(self, rt: Runtime, coalescer: Coalescer, rebalancer: Rebalancer) -> None:
        self._rt = rt
        self._coalescer = coalescer
        self._rebalancer = rebalancer
        # (campaign, sku) -> monotonic time until which the item counts as sold out here.
        self._sold_out: dict[tuple[str, str], float] = {}

    async def reserve(
        self, campaign_id: str, user_id: str, sku: str, qty: int, idempotency_key: str
    ) -> Reservation:
        """Hold ``qty`` units for the user until the campaign's hold deadline."""
        keys = keys_of(campaign_id)
        check_id(user_id, "user_id")
        check_id(sku, "sku")
        check_key(idempotency_key, "idempotency_key")
        check_int(qty, "qty", 1, MAX_UNITS)
        layout = self._rt.layouts.get(keys.campaign_id) or await self._rt.layout(campaign_id)
        if layout.sharded:
            return await self._sharded(layout, user_id, sku, qty, idempotency_key)
        flag = (keys.campaign_id, sku)
        sold_out = self._sold_out.get(flag, 0.0) > time.monotonic()
        try:
            outcome = await self._coalescer.reserve(
                keys.campaign_id, user_id, sku, qty, idempotency_key, probe=sold_out
            )
        except Archived:
            raise await archived_refusal(self._rt, keys.campaign_id, "reserve") from None
        if isinstance(outcome, Reservation):
            if sold_out:  # a unit came back: the item is on sale again here
                self._sold_out.pop(flag, None)
            return outcome
        ttl = self._rt.settings.sold_out_ttl
        if ttl and not sold_out and outcome.code is Code.SOLD_OUT and int(outcome.detail) == 0:
            self._sold_out[flag] = time.monotonic() + ttl
        raise outcome.error()

    async def _sharded(
        self, layout: Layout, user_id: str, sku: str, qty: int, idempotency_key: str
    ) -> Reservation:
        """A reservation in the user's stock bucket; when the bucket has too few units, a
        refill from the other buckets (shared with the other reservations waiting for it),
        then again, up to ROUNDS times (engine/shards.py)."""
        campaign_id = layout.campaign_id
        shard = layout.shard_of_user(user_id)
        flag = (campaign_id, sku)
        ttl = self._rt.settings.sold_out_ttl
        try:
            for _ in range(ROUNDS):
                sold_out = self._sold_out.get(flag, 0.0) > time.monotonic()
                outcome = await self._coalescer.reserve(
                    campaign_id, user_id, sku, qty, idempotency_key, probe=sold_out, shard=shard
                )
                if isinstance(outcome, Reservation):
                    return outcome
                if sold_out or outcome.code is not Code.SOLD_OUT:
                    raise outcome.error()
                left = await self._rebalancer.refill(layout, sku, shard, qty)
                if left is not None:  # the whole item is sold out
                    if ttl and left == 0:
                        self._sold_out[flag] = time.monotonic() + ttl
                    raise Refusal(Code.SOLD_OUT, left).error()
        except Archived:  # a bucket's script or a refill's read found it archived
            raise await archived_refusal(self._rt, campaign_id, "reserve") from None
        self._rebalancer.count("gave_up")
        raise Refusal(Code.SOLD_OUT, 0).error()
