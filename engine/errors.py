"""Every exception flashteam raises, under one root.

    EngineError
    ├── ValidationError          bad input: nothing was read or written
    │   └── TooDeep              a JSON body nested deeper than the API reads
    ├── ConfigurationError       settings or the Redis server are unfit to run on
    ├── Unavailable              Redis or SQL cannot be reached (retry later)
    │   ├── Recovering           the campaign's Redis state is being repaired from SQL
    │   └── PaymentPending       paid in Redis, not yet confirmed by SQL: retry to learn
    └── Rejected                 a business rule said no; ``code`` names which
        ├── NotFound             ├── SoldOut            ├── HoldExpired
        │   └── OrderNotFound    ├── PaymentRefUsed     ├── AmountMismatch
        ├── NotStarted           ├── LimitExceeded      ├── InvalidState
        ├── Ended                ├── RateLimited        ├── NotEditable
        │   └── Archived
        ├── Invalidated          ├── IdempotencyMismatch├── TeamFull
        ├── Forbidden            ├── TeamClosed         ├── AlreadyInTeam
        ├── AlreadyExists        ├── TeamInProgress     └── OrderLimitExceeded

Each class carries ``code``, the snake_case name the HTTP layer puts in its error body, and
keyword ``details`` that travel with it (``starts_at`` for NotStarted, ``retry_after`` for
RateLimited, ...). Foreign exceptions are translated at one boundary (engine.scripts) and
chained with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EngineError(Exception):
    """Raised for every failure flashteam reports; never raised directly."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ValidationError(EngineError):
    """Raised when an argument breaks its type, range or id pattern."""

    code = "validation_error"


class TooDeep(ValidationError):
    """Raised when a JSON body nests arrays and objects deeper than the API reads."""

    code = "json_too_deep"


class ConfigurationError(EngineError):
    """Raised when settings or the Redis server make it unsafe to start."""

    code = "configuration_error"


class Unavailable(EngineError):
    """Raised when Redis or the SQL store cannot be reached. ``service`` names which ("redis"
    or "sql"); then ``message`` carries the driver's words for the logs, and ``public``, what
    an HTTP answer says, names only the service (no address, no driver text)."""

    code = "unavailable"

    def __init__(self, message: str, *, service: str | None = None, **details: Any) -> None:
        if service is not None:
            details["service"] = service
        super().__init__(message, **details)
        self.service = service

    @property
    def public(self) -> str:
        """The message for an answer without a token: the service, not where nor why."""
        if self.service is None:
            return self.message
        return f"{_SERVICES.get(self.service, self.service)} is unavailable: retry shortly"


_SERVICES = {"redis": "Redis", "sql": "the SQL store"}


class Recovering(Unavailable):
    """Raised while a campaign's Redis state is repaired from SQL after Redis lost writes
    (docs/faults.md); its operations answer 503 with ``reason`` "recovering" until then."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, reason="recovering", **details)


class PaymentPending(Unavailable):
    """Raised when a payment is recorded in Redis but SQL did not confirm it within the wait
    (``FLASHTEAM_PAY_WAIT``): its outcome is not known yet, and it is not declined. A retry
    with the same ``payment_ref`` answers the definitive outcome once SQL answers."""

    code = "payment_pending"


class Rejected(EngineError):
    """Raised when a business rule refuses the operation; nothing was changed."""

    code = "rejected"


class NotFound(Rejected):
    """Raised when the campaign, sku, order or team does not exist."""

    code = "not_found"


class OrderNotFound(NotFound):
    """Raised when an order id names no order: a campaign that does not exist, a stock
    bucket it does not have, a number it never issued, or an order it does not hold."""

    code = "order_not_found"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"no order {order_id}", id=order_id)


class PaymentRefUsed(Rejected):
    """Raised when a payment reference already paid another order (one reference pays one
    order; details: ``order_id``, the order it paid)."""

    code = "payment_ref_used"


class AmountMismatch(Rejected):
    """Raised when the amount the gateway says was paid is not what the order costs
    (details: ``amount``, the order's)."""

    code = "amount_mismatch"


class NotStarted(Rejected):
    """Raised when the campaign has not started yet (details: ``starts_at``)."""

    code = "not_started"


class Ended(Rejected):
    """Raised when the campaign (or, for joins, the team) has ended."""

    code = "ended"


class Archived(Ended):
    """Raised when the campaign was archived out of Redis (engine.archive): it is over, and
    SQL holds it alone. Answered as ``ended``; pay, cancel and refund are served from SQL."""

    def __init__(self, campaign_id: str) -> None:
        super().__init__(f"campaign {campaign_id} has ended (archived)", id=campaign_id)


class Invalidated(Rejected):
    """Raised when the merchant invalidated the campaign."""

    code = "invalidated"


class SoldOut(Rejected):
    """Raised when the item has fewer units left than asked for."""

    code = "sold_out"


class LimitExceeded(Rejected):
    """Raised when the user's held + paid units would pass the per-user limit."""

    code = "limit_exceeded"


class OrderLimitExceeded(Rejected):
    """Raised when one order asks for more units than the campaign's per-order cap
    (details: ``per_order_limit``)."""

    code = "order_limit_exceeded"


class RateLimited(Rejected):
    """Raised when the user made too many attempts (details: ``retry_after`` seconds)."""

    code = "rate_limited"


class IdempotencyMismatch(Rejected):
    """Raised when an idempotency key is reused with different parameters."""

    code = "idempotency_mismatch"


class Forbidden(Rejected):
    """Raised when a user acts on an order or team that is not theirs."""

    code = "forbidden"


class HoldExpired(Rejected):
    """Raised when a payment arrives after the hold's deadline."""

    code = "hold_expired"


class InvalidState(Rejected):
    """Raised when the order or team is not in a state that allows the operation."""

    code = "invalid_state"


class AlreadyExists(Rejected):
    """Raised when a campaign id is already taken."""

    code = "already_exists"


class NotEditable(Rejected):
    """Raised when a campaign edit breaks the lifecycle rules (docs/lifecycle.md#campaign)."""

    code = "not_editable"


class TeamFull(Rejected):
    """Raised when every seat of the team is held or paid."""

    code = "team_full"


class TeamClosed(Rejected):
    """Raised when the team is not open (pending, succeeded, failed, dissolved or expired)."""

    code = "team_closed"


class AlreadyInTeam(Rejected):
    """Raised when the user already holds a seat in the team (leaders included)."""

    code = "already_in_team"


class TeamInProgress(Rejected):
    """Raised when a paid order of an open team is cancelled by its user."""

    code = "team_in_progress"
