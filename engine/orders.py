"""Orders of every kind (flash and team): pay, cancel, after-sale refund, and reads.

One script per operation; a team order's payment opens its team or makes it succeed, its
cancellation frees the seat (the scripts do both). Reads look in Redis first (live state) and
fall back to the durable store, which keeps every order the flush worker wrote.
"""

from __future__ import annotations

from engine.errors import NotFound
from engine.keys import STREAM_SET, campaign_of_order, check_id, check_key, keys_of
from engine.models import Order
from engine.runtime import Runtime
from engine.scripts import guarded


class Orders:
    """Pay, cancel, refund and read any order."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._scripts = rt.scripts

    async def pay(self, order_id: str, user_id: str, payment_ref: str) -> Order:
        """Mark the held order paid; a retry with the same ``payment_ref`` is a no-op."""
        campaign_of_order(order_id)  # validated before the other fields
        check_id(user_id, "user_id")
        check_key(payment_ref, "payment_ref")
        return await self._scripts.pay(order_id, user_id, payment_ref)

    async def cancel(self, order_id: str, user_id: str) -> Order:
        """The owner cancels a held order; its stock is sellable again at once."""
        campaign_of_order(order_id)  # validated before the other fields
        check_id(user_id, "user_id")
        return await self._scripts.cancel(order_id, user_id)

    async def refund(self, order_id: str, restock: bool) -> Order:
        """After-sale refund of a paid order; its units go back on sale only if ``restock``."""
        campaign_id = campaign_of_order(order_id)
        order = await self._scripts.refund(order_id, bool(restock))
        # The campaign may be over and its outbox forgotten by the flush worker: register it
        # again after the event is in the stream (the worker re-checks after forgetting).
        await guarded(self._rt.redis.sadd(STREAM_SET, campaign_id))
        return order

    async def get(self, order_id: str) -> Order:
        """The order's current state: Redis while it is there, else the durable store."""
        keys = keys_of(campaign_of_order(order_id))
        record = await guarded(self._rt.redis.hget(keys.orders, order_id))
        if record is not None:
            return Order.from_record(order_id, record)
        stored = await self._rt.store.get_order(order_id)
        if stored is None:
            raise NotFound(f"no order {order_id}", id=order_id)
        return stored

    async def of_user(self, user_id: str, limit: int) -> list[Order]:
        """The user's orders from the durable store, newest first."""
        return await self._rt.store.user_orders(check_id(user_id, "user_id"), limit)
