"""``POST /v1/batch``: many storefront calls in one request, for a gateway that serves many
shoppers (docs/http.md#batch).

Each item is one call of the single-call API, named by ``op``: ``reserve``, ``open_team``,
``join``, ``quick_join`` or ``pay``, with that call's body plus the id its path would carry
(``campaign_id``, ``team_id`` or ``order_id``). Items may name different campaigns. The answer
has one result per item, in order: the status and the JSON body the single call would have
answered (its order, or its ``{"error": ...}``), so each item keeps the single call's
semantics, idempotency and error codes. An item that is not valid fails alone (400
``validation_error`` in its result); the batch itself is refused only when it is not a JSON
object with a ``requests`` list of 1 to ``MAX_ITEMS`` items.

The items run concurrently, submitted in their order: reservations, joins and quick-joins of
one campaign share coalesced script calls (engine/coalesce.py) and run in item order, so a
retry of an item later in the same batch replays it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from engine import errors
from engine.api import schemas as s
from engine.core import Engine
from engine.keys import campaign_of_order, campaign_of_team

log = logging.getLogger(__name__)

MAX_ITEMS = 256


class ReserveItem(s.Request, tag_field="op", tag="reserve"):
    campaign_id: s.Id
    user_id: s.Id
    sku: s.Id
    qty: s.Units
    idempotency_key: s.Key


class OpenTeamItem(s.Request, tag_field="op", tag="open_team", kw_only=True):
    campaign_id: s.Id
    user_id: s.Id
    sku: s.Id
    qty: s.Units = 1
    idempotency_key: s.Key


class JoinItem(s.Request, tag_field="op", tag="join"):
    team_id: Annotated[str, Meta(description="<campaign>.t<number>")]
    user_id: s.Id
    idempotency_key: s.Key


class QuickJoinItem(s.Request, tag_field="op", tag="quick_join"):
    campaign_id: s.Id
    user_id: s.Id
    sku: s.Id
    idempotency_key: s.Key


class PayItem(s.Request, tag_field="op", tag="pay"):
    order_id: Annotated[str, Meta(description="<campaign>.o<number>")]
    user_id: s.Id
    payment_ref: s.Key
    amount: s.PaidAmount | None = None


Item = ReserveItem | OpenTeamItem | JoinItem | QuickJoinItem | PayItem


class BatchIn(s.Request):
    """Up to ``MAX_ITEMS`` storefront calls (the documented body: an item is checked on its
    own, and one that is not valid fails alone, in its result, so the batch takes any)."""

    requests: Annotated[
        list[Any],
        Meta(
            min_length=1,
            max_length=MAX_ITEMS,
            description="each item one call, named by op: reserve (campaign_id, user_id, sku, "
            "qty, idempotency_key), open_team (campaign_id, user_id, sku, qty, "
            "idempotency_key), join (team_id, user_id, idempotency_key), quick_join "
            "(campaign_id, user_id, sku, idempotency_key) or pay (order_id, user_id, "
            "payment_ref, amount); an item that is not one has its own 400 result",
        ),
    ]


class BatchResult(Struct):
    """One item's answer: the single call's status and JSON body."""

    status: int
    body: Any


class BatchOut(Struct):
    results: list[BatchResult]


class _Envelope(s.Request):
    requests: Annotated[list[msgspec.Raw], Meta(min_length=1, max_length=MAX_ITEMS)]


_envelope = msgspec.json.Decoder(_Envelope)
_item = msgspec.json.Decoder(Item)

ErrorBody = Callable[[errors.EngineError], tuple[int, dict[str, Any]]]
# Records a failed item: (route, error, the item's campaign id when asked) -> None
Failed = Callable[[str, errors.EngineError, Callable[[], str | None]], None]


def decode(raw: bytes) -> list[Item | errors.ValidationError]:
    """The batch's items, each decoded on its own: a bad item becomes its ValidationError;
    ValidationError for the whole batch when it is not ``{"requests": [...]}``."""
    envelope = s.decode_json(_envelope, raw, ' (a batch is {"requests": [...]})')
    items: list[Item | errors.ValidationError] = []
    for n, part in enumerate(envelope.requests):
        try:
            items.append(_item.decode(part))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            items.append(errors.ValidationError(f"requests[{n}]: {exc}", index=n))
    return items


async def execute(
    engine: Engine,
    items: list[Item | errors.ValidationError],
    error_body: ErrorBody,
    failed: Failed,
) -> BatchOut:
    """Run every item (concurrently, submitted in order) and answer each as its single call
    would; ``failed`` records each error as the single call's route does (a 503's reason,
    a business rejection in its campaign's KPIs)."""
    results = await asyncio.gather(*(_one(engine, item, error_body, failed) for item in items))
    return BatchOut(list(results))


async def _one(
    engine: Engine, item: Item | errors.ValidationError, error_body: ErrorBody, failed: Failed
) -> BatchResult:
    try:
        if isinstance(item, errors.ValidationError):
            raise item
        status, body = await _call(engine, item)
        return BatchResult(status, body)
    except errors.EngineError as exc:
        failed("batch", exc, lambda: _campaign_of(item))
        return BatchResult(*error_body(exc))
    except Exception:
        # The item's kind only: its fields carry payment references and user ids.
        log.exception("batch item failed: %s", type(item).__name__)
        return BatchResult(*error_body(errors.EngineError("internal error")))


async def _call(engine: Engine, item: Item) -> tuple[int, Any]:
    if isinstance(item, ReserveItem):
        held = await engine.flash.reserve(
            item.campaign_id, item.user_id, item.sku, item.qty, item.idempotency_key
        )
        return 201, s.ReservationOut.of(held.order, replayed=held.replayed)
    if isinstance(item, PayItem):
        order = await engine.orders.pay(item.order_id, item.user_id, item.payment_ref, item.amount)
        return 200, s.OrderOut.of(order)
    if isinstance(item, JoinItem):
        seat = await engine.teams.join(item.team_id, item.user_id, item.idempotency_key)
    elif isinstance(item, QuickJoinItem):
        seat = await engine.teams.quick_join(
            item.campaign_id, item.user_id, item.sku, item.idempotency_key
        )
    else:
        seat = await engine.teams.open(
            item.campaign_id, item.user_id, item.sku, item.qty, item.idempotency_key
        )
    return 201, s.SeatOut.of(seat)


def _campaign_of(item: Item | errors.ValidationError) -> str | None:
    try:
        if isinstance(item, PayItem):
            return campaign_of_order(item.order_id)
        if isinstance(item, JoinItem):
            return campaign_of_team(item.team_id)
    except errors.ValidationError:
        return None
    return None if isinstance(item, errors.ValidationError) else item.campaign_id
