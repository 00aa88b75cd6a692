"""The outbox event schema: what every script appends to ``ft:{c:<campaign>}:events``.

Each state change appends exactly one stream entry in the same atomic script as the change,
so Redis state and its events can never disagree. Entry fields (all strings):

    type    order.reserved | order.paid | order.cancelled | order.expired | order.refunded
            | campaign.invalidated
    order   the order id ``<campaign>.o<n>``                      (order.* only)
    record  the full order after the change, packed as
            ``user|sku|qty|amount|state|created_ms|deadline_ms|version|kind|team|payment_ref``
            (state H/P/C/E/R, kind f/t; see lua/lib/common.lua)    (order.* only)
    at      when it happened, ms on the Redis clock
    reason  user | deadline | invalidated | restock | no_restock | merchant

``version`` starts at 1 and grows by one per change of that order, so a consumer that keeps
the highest version per order id applies changes exactly once in effect, in any delivery order
(SPEC 6.4). The stream id orders the entries of one campaign.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ValidationError
from engine.models import Order, from_ms

ORDER_EVENTS = frozenset(
    {"order.reserved", "order.paid", "order.cancelled", "order.expired", "order.refunded"}
)
CAMPAIGN_EVENTS = frozenset({"campaign.invalidated"})


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded outbox entry; ``order`` is set for order.* events."""

    stream_id: str
    type: str
    at_ms: int
    reason: str
    order: Order | None

    @classmethod
    def decode(cls, stream_id: str, fields: dict[str, str]) -> Event:
        """Decode a stream entry; ValidationError for a malformed (poison) entry."""
        try:
            kind = fields["type"]
            order = None
            if kind in ORDER_EVENTS:
                order = Order.from_record(fields["order"], fields["record"])
            elif kind not in CAMPAIGN_EVENTS:
                raise ValueError(f"unknown event type {kind!r}")
            at_ms = int(fields["at"])
            from_ms(at_ms)
            return cls(stream_id, kind, at_ms, fields["reason"], order)
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise ValidationError(f"malformed event {stream_id}: {exc!r}") from exc
