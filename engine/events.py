"""The outbox event schema: what every script appends to ``ft:{c:<campaign>}:events``
(docs/events.md: who emits each type and how the flush worker applies it).

Each state change appends its stream entry in the same atomic script as the change, so Redis
state and its events can never disagree. Entry fields (all strings):

    type    order.reserved | order.paid | order.cancelled | order.expired | order.refunded
            team.created | team.opened | team.joined | team.seat_paid | team.seat_released
            | team.succeeded | team.failed | team.dissolved
            campaign.invalidated
    order   order.*: the order id ``<campaign>.o<n>``; team.*: the order that caused it
            (the joining, paying or released seat; the leader's for opened and dissolved;
            empty for failed)
    team    team.*: the team id ``<campaign>.t<n>``
    record  order.*: the whole order after the change,
              ``user|sku|qty|amount|state|created_ms|deadline_ms|version|kind|team|payment_ref``
              (state H/P/C/E/R, kind f/t; lua/lib/common.lua)
            team.*: the whole team after the change,
              ``leader|sku|qty|size|state|created_ms|opened_ms|expires_ms|held|paid|version|why|
              seats`` (state W/O/S/F/D; lua/lib/team.lua)
    at      when it happened, ms on the Redis clock
    reason  user | deadline | invalidated | team_failed | restock | no_restock | merchant
            | expired (team.failed)
    idem    order.reserved only: ``<op><user>:<key>``, the idempotency record of the request
            that created the order (op r reserve, o open team, j join, q quick-join)

``version`` starts at 1 and grows by one per change of that order (or team), so a consumer
that keeps the highest version per id applies changes exactly once in effect, in any delivery
order (invariant I4, docs/invariants.md). A failed team's refunds are ``order.refunded``
events with reason ``team_failed``; the team id is in their record.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ValidationError
from engine.models import Order, Team, from_ms

ORDER_EVENTS = frozenset(
    {"order.reserved", "order.paid", "order.cancelled", "order.expired", "order.refunded"}
)
TEAM_EVENTS = frozenset(
    {
        "team.created",
        "team.opened",
        "team.joined",
        "team.seat_paid",
        "team.seat_released",
        "team.succeeded",
        "team.failed",
        "team.dissolved",
    }
)
CAMPAIGN_EVENTS = frozenset({"campaign.invalidated"})


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded outbox entry: ``order`` for order.* events, ``team`` for team.* events."""

    stream_id: str
    type: str
    at_ms: int
    reason: str
    order: Order | None
    team: Team | None
    order_id: str | None
    idem: str | None = None

    @property
    def restocked(self) -> bool | None:
        """For an order.refunded event: whether the units went back on sale."""
        if self.type != "order.refunded":
            return None
        return self.reason != "no_restock"

    @classmethod
    def decode(cls, stream_id: str, fields: dict[str, str]) -> Event:
        """Decode a stream entry; ValidationError for a malformed (poison) entry."""
        try:
            kind = fields["type"]
            order = team = None
            order_id = fields.get("order") or None
            if kind in ORDER_EVENTS:
                order = Order.from_record(fields["order"], fields["record"])
            elif kind in TEAM_EVENTS:
                team = Team.from_record(fields["team"], fields["record"])
            elif kind not in CAMPAIGN_EVENTS:
                raise ValueError(f"unknown event type {kind!r}")
            at_ms = int(fields["at"])
            from_ms(at_ms)
            reason = fields["reason"]
            return cls(stream_id, kind, at_ms, reason, order, team, order_id, fields.get("idem"))
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise ValidationError(f"malformed event {stream_id}: {exc!r}") from exc
