"""Flash-sale operations: reserve, pay, cancel, after-sale refund, and reading an order.

Each operation is one Lua script call (SPEC section 4); outcomes come back as codes and leave
here as an ``Order`` or a ``Rejected`` subclass. Reservations are coalesced per campaign
(``engine.coalesce``).

The sold-out fast path: once a reservation finds an item with no units left, this process
answers further reservations of that item with ``sold_out`` for ``settings.sold_out_ttl``
seconds
without running the reservation: they ride in a coalesced batch as a replay probe (one GET of
their idempotency key), so a retry of a reservation that did succeed still gets its order
back. Units returned by an expiry or a cancel are sellable again within that time (0.5 s by
default; never more than 1 s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from engine.coalesce import PROBE, RESERVE, Coalescer
from engine.errors import NotFound, ValidationError
from engine.keys import STREAM_SET, campaign_of_order, check_id, check_key, keys_of
from engine.models import MAX_UNITS, Order
from engine.runtime import Runtime
from engine.scripts import Code, check_reply, guarded


@dataclass(slots=True)  # not frozen: one per request (see engine.models.Order)
class Reservation:
    """A held order; ``replayed`` when an idempotent retry returned the original order."""

    order: Order
    replayed: bool


def order_from_reply(reply: list[Any], campaign_id: str | None = None) -> Order:
    """The order of a ``{0, order_id, record, ...}`` reply (of ``campaign_id``'s scripts when
    given), or the matching rejection."""
    check_reply(reply)
    return Order.from_record(reply[1], reply[2], campaign_id)


class FlashSale:
    """The flash-sale path of SPEC section 4."""

    def __init__(self, rt: Runtime, coalescer: Coalescer) -> None:
        self._rt = rt
        self._scripts = rt.scripts
        self._coalescer = coalescer
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
        if isinstance(qty, bool) or not isinstance(qty, int) or not 1 <= qty <= MAX_UNITS:
            raise ValidationError(f"qty must be an integer from 1 to {MAX_UNITS}", field="qty")
        flag = (keys.campaign_id, sku)
        sold_out = self._sold_out.get(flag, 0.0) > time.monotonic()
        reply = await self._coalescer.submit(
            keys.campaign_id,
            PROBE if sold_out else RESERVE,
            user_id,
            sku,
            str(qty),
            idempotency_key,
        )
        ttl = self._rt.settings.sold_out_ttl
        if ttl and reply[0] == Code.SOLD_OUT and int(reply[1]) == 0 and not sold_out:
            self._sold_out[flag] = time.monotonic() + ttl
        return Reservation(order_from_reply(reply, keys.campaign_id), replayed=reply[3] == 1)

    async def pay(self, order_id: str, user_id: str, payment_ref: str) -> Order:
        """Mark the held order paid; a retry with the same ``payment_ref`` is a no-op."""
        keys = keys_of(campaign_of_order(order_id))
        check_id(user_id, "user_id")
        check_key(payment_ref, "payment_ref")
        reply = await self._scripts.run(
            self._scripts.pay_order, keys.order_keys, (order_id, user_id, payment_ref)
        )
        return order_from_reply(reply)

    async def cancel(self, order_id: str, user_id: str) -> Order:
        """The owner cancels a held order; its stock is sellable again at once."""
        keys = keys_of(campaign_of_order(order_id))
        check_id(user_id, "user_id")
        reply = await self._scripts.run(
            self._scripts.cancel_order, keys.order_keys, (order_id, user_id)
        )
        return order_from_reply(reply)

    async def refund(self, order_id: str, restock: bool) -> Order:
        """After-sale refund of a paid order; its units go back on sale only if ``restock``."""
        keys = keys_of(campaign_of_order(order_id))
        reply = await self._scripts.run(
            self._scripts.refund_order, keys.order_keys, (order_id, int(bool(restock)))
        )
        order = order_from_reply(reply)
        # The campaign may be over and its outbox forgotten by the flush worker: register it
        # again after the event is in the stream (the worker re-checks after forgetting).
        await guarded(self._rt.redis.sadd(STREAM_SET, keys.campaign_id))
        return order

    async def get_order(self, order_id: str) -> Order:
        """The order's current state in Redis."""
        keys = keys_of(campaign_of_order(order_id))
        record = await guarded(self._rt.redis.hget(keys.orders, order_id))
        if record is None:
            raise NotFound(f"no order {order_id}", id=order_id)
        return Order.from_record(order_id, record)
