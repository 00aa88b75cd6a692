"""The HTTP API for the storefront gateway (docs/http.md): routes over the engine, msgspec for
every body in and out, served by flashteam's own HTTP server (engine/api/server.py) or, through
``Api.app``, by any ASGI server.

Each handler is wrapped once by ``_route``: it admits the request or refuses it at once (503
``overloaded``, engine/api/admission.py), checks the bearer token (constant time), takes the
body read under the size cap, waits for the handler at most ``FLASHTEAM_REQUEST_TIMEOUT``
(then 503 ``unavailable``: the work goes on and a retry with the same key finds its outcome),
turns every ``EngineError`` into the JSON error body with its HTTP status, counts rejections
for the campaign KPIs and records the request's latency per route and outcome. A 500 means a
bug, and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from enum import Enum
from functools import partial
from types import UnionType
from typing import Any, TypeVar, cast

import msgspec

from engine import errors
from engine.api import batch, live, metrics
from engine.api import schemas as s
from engine.api.admission import Admission, Priority
from engine.api.http import (
    AsgiAdapter,
    Handler,
    HttpRequest,
    HttpResponse,
    NoRoute,
    Router,
    refusal,
)
from engine.api.openapi import Operation, openapi_document
from engine.core import Engine
from engine.keys import campaign_of_order, campaign_of_team, check_id
from engine.models import Campaign, CampaignKind
from engine.settings import Settings
from engine.stats import CampaignStats, RejectionCounter, campaign_stats

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS: dict[str, int] = {
    "validation_error": 400,
    "json_too_deep": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "order_not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "overloaded": 503,
    "payment_pending": 503,
}
CONFLICT = 409  # every other business rejection: sold_out, team_full, hold_expired, ...


_NO_STORE = ((b"cache-control", b"no-store"),)
_OVERLOADED = refusal(
    503,
    "overloaded",
    "this worker runs all the requests it can serve in time: retry after Retry-After",
    retry_after=1,
)
PROBE_EVERY = 1.0  # seconds /readyz and /metrics reuse what they last read from Redis and SQL
PROBE_TIMEOUT = 1.0  # seconds /readyz and /metrics wait for Redis and for SQL
# The live page and its assets: its own script and styles only, data from this origin only.
_PAGE_HEADERS = (
    *_NO_STORE,
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)
_ASSETS = {"live.js": b"text/javascript; charset=utf-8", "live.css": b"text/css; charset=utf-8"}


class Access(Enum):
    """Which bearer token a route takes."""

    PUBLIC = 0  # health, metrics, the OpenAPI document: no token
    GATEWAY = 1  # storefront calls (the admin token works too)
    ADMIN = 2


class ApiError(errors.EngineError):
    """An HTTP-level refusal: bad token, body too large, unknown route or method."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.http_code = code


def _enc_hook(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
# A new campaign is one of two bodies, told apart by "kind".
_CAMPAIGN_IN: msgspec.json.Decoder[s.FlashCampaignIn | s.TeamCampaignIn] = msgspec.json.Decoder(
    s.CampaignIn
)


def _matches(given: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Whether ``given`` is one of ``tokens``: each compared in constant time, and all of them
    every time, so the time taken tells nothing about which one, if any, matched."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token)
    return found


def json_response(
    body: Any, status: int = 200, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> HttpResponse:
    return HttpResponse(status, _encoder.encode(body), headers=headers)


def _campaign_of_request(request: HttpRequest) -> str | None:
    """The campaign a request's path names (its campaign, order or team id), or None."""
    params = request.params
    with contextlib.suppress(errors.ValidationError):
        if "campaign_id" in params:
            return check_id(params["campaign_id"], "campaign_id")
        if "order_id" in params:
            return campaign_of_order(params["order_id"])
        if "team_id" in params:
            return campaign_of_team(params["team_id"])
    return None


def error_body(exc: errors.EngineError) -> tuple[int, dict[str, Any]]:
    """An error's status and its body ``{"error": {"code", "message", ...details}}``."""
    code = exc.http_code if isinstance(exc, ApiError) else exc.code
    status = STATUS.get(code, CONFLICT if isinstance(exc, errors.Rejected) else 500)
    if status == 500:  # a bug: its text is for the log (``Api._failed``), not the caller
        return status, {"error": {"code": code, "message": "internal error"}}
    message = exc.public if isinstance(exc, errors.Unavailable) else exc.message
    details = {k: v for k, v in exc.details.items() if k not in ("code", "message")}
    return status, {"error": {"code": code, "message": message, **details}}


def error_response(exc: errors.EngineError) -> HttpResponse:
    status, body = error_body(exc)
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if isinstance(exc, errors.RateLimited):
        retry = max(1, int(float(exc.details.get("retry_after", 1)) + 0.999))
        headers = ((b"retry-after", str(retry).encode()),)
    elif isinstance(exc, errors.Unavailable):
        headers = ((b"retry-after", b"1"),)
    return json_response(body, status, headers)


class Api:
    """The routes over one Engine; ``app`` is the ASGI application."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        gateway, admin = settings.require_tokens()
        self._gateway = tuple(token.encode() for token in gateway)
        self._admin = tuple(token.encode() for token in admin)
        self._gateway_headers = tuple(b"Bearer " + token for token in self._gateway)
        self._admin_headers = tuple(b"Bearer " + token for token in self._admin)
        self._engine = engine
        self._rejections: RejectionCounter | None = None
        self._owned = False
        self._stop = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._openapi: bytes | None = None
        self.operations: list[Operation] = []
        self._router = Router(cache_params=frozenset({"campaign_id"}))
        self._unavailable_logged: dict[tuple[str, str], float] = {}
        self.admission = Admission(
            settings.admission_target, settings.admission_min, settings.admission_max
        )
        self._readiness = metrics.Cached(self._probe_readiness, PROBE_EVERY)
        self._dependencies = metrics.Cached(self._probe_dependencies, PROBE_EVERY)
        gw, adm, pub = Access.GATEWAY, Access.ADMIN, Access.PUBLIC
        o = s.OrderOut
        routes = [
            self._route(
                "POST",
                "/v1/campaigns",
                self.create_campaign,
                adm,
                s.CampaignIn,
                s.CampaignOut,
                201,
            ),
            self._route(
                "GET", "/v1/campaigns/{campaign_id}", self.get_campaign, gw, None, s.CampaignOut
            ),
            self._route(
                "PATCH",
                "/v1/campaigns/{campaign_id}",
                self.edit_campaign,
                adm,
                s.CampaignPatch,
                s.CampaignOut,
            ),
            self._route(
                "POST",
                "/v1/campaigns/{campaign_id}/invalidate",
                self.invalidate,
                adm,
                None,
                s.CampaignOut,
            ),
            self._route(
                "POST",
                "/v1/campaigns/{campaign_id}/orders",
                self.reserve,
                gw,
                s.ReserveIn,
                s.ReservationOut,
                201,
            ),
            self._route(
                "GET", "/v1/campaigns/{campaign_id}/stats", self.stats, gw, None, CampaignStats
            ),
            self._route(
                "POST",
                "/v1/campaigns/{campaign_id}/teams",
                self.open_team,
                gw,
                s.OpenTeamIn,
                s.SeatOut,
                201,
            ),
            self._route(
                "GET",
                "/v1/campaigns/{campaign_id}/teams",
                self.joinable,
                gw,
                None,
                s.TeamsOut,
                query=(("sku", True), ("viewer", False), ("limit", False)),
            ),
            self._route(
                "POST",
                "/v1/campaigns/{campaign_id}/teams/quick-join",
                self.quick_join,
                gw,
                s.QuickJoinIn,
                s.SeatOut,
                201,
            ),
            self._route("POST", "/v1/orders/{order_id}/pay", self.pay, gw, s.PayIn, o, money=True),
            self._route(
                "POST", "/v1/orders/{order_id}/cancel", self.cancel, gw, s.CancelIn, o, money=True
            ),
            self._route("POST", "/v1/orders/{order_id}/refund", self.refund, adm, s.RefundIn, o),
            self._route(
                "GET",
                "/v1/orders/{order_id}",
                self.get_order,
                gw,
                None,
                o,
                query=(("user_id", False),),
                money=True,
            ),
            self._route(
                "GET",
                "/v1/users/{user_id}/orders",
                self.user_orders,
                gw,
                None,
                s.OrdersOut,
                query=(("limit", False),),
                money=True,
            ),
            self._route(
                "POST", "/v1/teams/{team_id}/join", self.join, gw, s.JoinIn, s.SeatOut, 201
            ),
            self._route(
                "GET",
                "/v1/teams/{team_id}",
                self.team_view,
                gw,
                None,
                s.ShareOut,
                query=(("viewer", False),),
            ),
            self._route(
                "GET", "/v1/teams/{team_id}/orders", self.team_orders, adm, None, s.OrdersOut
            ),
            self._route("POST", "/v1/batch", self.batch, gw, batch.BatchIn, batch.BatchOut),
            self._route("GET", "/v1/live", self.live_figures, adm, None, live.LiveOut),
            self._route("GET", "/live", self.live_page, pub, None, None),
            self._route("GET", "/live/{asset}", self.live_asset, pub, None, None),
            self._route("GET", "/healthz", self.healthz, pub, None, s.Health),
            self._route("GET", "/readyz", self.readyz, pub, None, s.Health),
            self._route("GET", "/metrics", self.metrics, pub, None, None),
            self._route("GET", "/openapi.json", self.openapi, pub, None, None),
        ]
        for method, path, endpoint in routes:
            self._router.add(method, path, endpoint)
        if settings.echo_route:
            self._router.add("POST", "/bench/echo", _echo)
        self.app = AsgiAdapter(self.handle, settings.max_body, self.startup, self.shutdown)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the engine opens in Api.startup"
        return self._engine

    async def startup(self) -> None:
        """Open the engine (unless given one) and start saving the rejection counters."""
        if self._engine is None:
            self._engine = await Engine.open(self.settings)
            self._owned = True
        self.engine.runtime.scripts.observe = metrics.observe_script
        if self.engine.orders.ledger is not None:
            self.engine.orders.ledger.observe = metrics.observe_payment
        self._rejections = RejectionCounter(self.engine.runtime)
        self._stop = asyncio.Event()
        self._saver = asyncio.create_task(self._save_counters(self._rejections, self._stop))
        self._flusher = asyncio.create_task(self._flush_metrics(self._stop))

    async def shutdown(self) -> None:
        """Save the last counters; close the engine if ``startup`` opened it."""
        self._stop.set()
        for task in (self._saver, self._flusher):
            if task is not None:
                await task
        self._saver = self._flusher = None
        if self._owned and self._engine is not None:
            await self._engine.close()
            self._engine, self._owned = None, False

    async def _save_counters(self, rejections: RejectionCounter, stop: asyncio.Event) -> None:
        """Add the rejection counters (the KPIs) and the rebalancer's counters (/metrics),
        counted in process, to Redis about once a second, and a last time when stopped: a
        sold-out storm or a refill costs no Redis call of its own to be counted."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for save in (rejections.flush, self.engine.rebalancer.save):
                try:
                    await save()
                except errors.EngineError as exc:
                    log.warning("counters not saved yet: %s", exc)

    async def _flush_metrics(self, stop: asyncio.Event) -> None:
        """Add the buffered latencies to the shared histograms, and the admission limit and
        requests in flight to their gauges, a few times a second."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), metrics.FLUSH_EVERY)
            metrics.flush()
            metrics.observe_admission(self.admission.limit, self.admission.in_flight)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request: its route's handler, or 404 / 405."""
        try:
            handler = self._router.resolve(request)
        except NoRoute as missing:
            if missing.allowed:
                message = f"{request.method} is not allowed on {request.path}"
                allow = ", ".join(missing.allowed).encode()
                refused = error_response(ApiError("method_not_allowed", message))
                return HttpResponse(refused.status, refused.body, headers=((b"allow", allow),))
            return error_response(ApiError("not_found", f"no route {request.path}"))
        return await handler(request)

    def _route(
        self,
        method: str,
        path: str,
        handler: Handler,
        access: Access,
        body: type | UnionType | None,
        out: type | None,
        status: int = 200,
        query: tuple[tuple[str, bool], ...] = (),
        money: bool = False,
    ) -> tuple[str, str, Handler]:
        """One route, recorded as an Operation for /openapi.json: (method, path, endpoint).
        ``money``: a shopper's payment depends on it (admitted first under overload, as the
        admin's calls are)."""
        name = f"{method} {path}"
        if access is Access.PUBLIC:
            priority = Priority.EXEMPT
        elif money or access is Access.ADMIN:
            priority = Priority.MONEY
        else:
            priority = Priority.NORMAL
        admission = self.admission
        timeout = self.settings.request_timeout
        pays = handler == self.pay
        if pays:
            # A payment's own wait for SQL (FLASHTEAM_PAY_WAIT) ends in a definitive answer or
            # payment_pending: the HTTP bound must not cut it short with a plain unavailable.
            timeout = max(timeout, self.settings.pay_wait)
        doc = (handler.__doc__ or name).strip()
        self.operations.append(
            Operation(
                method,
                path,
                doc,
                access is not Access.PUBLIC,
                access is Access.ADMIN,
                body,
                out,
                status,
                query,
            )
        )

        def ended(_: object, started: float) -> None:
            admission.done(time.perf_counter() - started)

        async def endpoint(request: HttpRequest) -> HttpResponse:
            started = time.perf_counter()
            outcome = "ok"
            try:
                self._authorize(request, access)
                if priority is Priority.EXEMPT:  # they bound their own waits (PROBE_TIMEOUT)
                    return await handler(request)
                if not admission.admit(priority):
                    outcome = "overloaded"
                    return _OVERLOADED
                work = asyncio.ensure_future(handler(request))
                work.add_done_callback(partial(ended, started=started))
                return await _within(work, timeout, pays=pays)
            except errors.EngineError as exc:
                outcome = exc.http_code if isinstance(exc, ApiError) else exc.code
                self._failed(name, exc, lambda: _campaign_of_request(request))
                return error_response(exc)
            except Exception:
                outcome = "internal"
                log.exception("%s failed", name)
                return error_response(errors.EngineError("internal error"))
            finally:
                metrics.observe_request(name, outcome, time.perf_counter() - started)

        return method, path, endpoint

    def _failed(
        self, route: str, exc: errors.EngineError, campaign_of: Callable[[], str | None]
    ) -> None:
        """What a call answered with an error records, on its own route or inside a batch:
        a 503's reason (logged at most once a second per route and reason: an outage answers
        every request with it), and a business rejection counted for its campaign's KPIs
        (``campaign_of``: its id, or None; not for ids nobody created, nor for an archived
        campaign, whose counters are in SQL now, engine/archive.py)."""
        if type(exc) is errors.EngineError:  # a bug the engine reported: answered as a 500
            log.error("%s failed: %s", route, exc.message)
        elif isinstance(exc, errors.Unavailable):
            now = time.monotonic()
            key = (route, exc.message)
            if now - self._unavailable_logged.get(key, 0.0) >= 1.0:
                self._unavailable_logged[key] = now
                log.warning("%s answered 503: %s", route, exc.message)
        elif isinstance(exc, errors.Rejected) and not isinstance(
            exc, errors.NotFound | errors.Archived
        ):
            campaign_id = campaign_of()
            if campaign_id is not None and self._rejections is not None:
                self._rejections.count(campaign_id, exc.code)

    def _authorize(self, request: HttpRequest, access: Access) -> None:
        if access is Access.PUBLIC:
            return
        header = request.header(b"authorization") or b""
        # The usual spelling, compared whole (constant time); any other goes the long way.
        if _matches(header, self._admin_headers):
            return
        if access is Access.GATEWAY and _matches(header, self._gateway_headers):
            return
        self._authorize_spelled(header.decode("latin-1"), access)

    def _authorize_spelled(self, header: str, access: Access) -> None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError("unauthorized", "send Authorization: Bearer <token>")
        given = token.strip().encode("latin-1")
        if _matches(given, self._admin):
            return
        gateway = _matches(given, self._gateway)
        if access is Access.GATEWAY and gateway:
            return
        if access is Access.ADMIN and gateway:
            raise ApiError("forbidden", "this call needs the admin token")
        raise ApiError("unauthorized", "unknown token")

    def _raw(self, request: HttpRequest) -> bytes:
        """The request body, within ``max_body`` (the server drops a larger one)."""
        if request.too_large:
            raise ApiError("payload_too_large", f"bodies are capped at {self.settings.max_body} B")
        return request.body

    def _body(self, request: HttpRequest, kind: type[T]) -> T:
        raw = self._raw(request)
        decoder = _decoders.get(kind)
        if decoder is None:
            decoder = _decoders[kind] = msgspec.json.Decoder(kind)
        return cast(T, s.decode_json(decoder, raw))

    @staticmethod
    def _query_int(request: HttpRequest, name: str, default: int, low: int, high: int) -> int:
        raw = request.query_param(name)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            raise errors.ValidationError(
                f"{name} must be an integer from {low} to {high}", field=name
            )
        return int(raw)

    @staticmethod
    def _query_id(request: HttpRequest, name: str, required: bool = False) -> str | None:
        raw = request.query_param(name)
        if raw is None:
            if required:
                raise errors.ValidationError(f"{name} is required", field=name)
            return None
        return check_id(raw, name)

    def _is_admin(self, request: HttpRequest) -> bool:
        header = (request.header(b"authorization") or b"").decode("latin-1")
        return _matches(header.partition(" ")[2].strip().encode("latin-1"), self._admin)

    # -- campaigns -----------------------------------------------------------------------------

    async def create_campaign(self, request: HttpRequest) -> HttpResponse:
        """Create a campaign (admin); it sells from starts_at."""
        body = s.decode_json(_CAMPAIGN_IN, self._raw(request))
        campaign = Campaign(
            id=body.id if body.id is not None else f"c{secrets.token_hex(8)}",
            kind=CampaignKind.FLASH if isinstance(body, s.FlashCampaignIn) else CampaignKind.TEAM,
            title=body.title,
            starts_at=body.starts_at,
            ends_at=body.ends_at,
            items=tuple(i.item() for i in body.items),
            per_user_limit=body.per_user_limit,
            hold_seconds=body.hold_seconds,
            team_size=body.team_size,
            team_ttl_seconds=body.team_ttl_seconds,
            shards=body.shards,
            per_order_limit=body.per_order_limit,
            auto_success_min_paid=body.auto_success_min_paid,
            min_pay_seconds=body.min_pay_seconds,
        )
        view = await self.engine.campaigns.create(campaign)
        return json_response(s.CampaignOut.of(view), 201)

    async def get_campaign(self, request: HttpRequest) -> HttpResponse:
        """A campaign: definition, status, live stock per item."""
        view = await self.engine.campaigns.get(request.params["campaign_id"])
        return json_response(s.CampaignOut.of(view))

    async def edit_campaign(self, request: HttpRequest) -> HttpResponse:
        """Edit a campaign (admin): any field while scheduled, a later ends_at while active."""
        body = self._body(request, s.CampaignPatch)
        changes = body.changes()
        if not changes:
            raise errors.ValidationError("send at least one field to change")
        view = await self.engine.campaigns.update(request.params["campaign_id"], changes)
        return json_response(s.CampaignOut.of(view))

    async def invalidate(self, request: HttpRequest) -> HttpResponse:
        """Invalidate a campaign (admin): no new orders, holds cancelled, open teams fail."""
        view = await self.engine.campaigns.invalidate(request.params["campaign_id"])
        return json_response(s.CampaignOut.of(view))

    async def stats(self, request: HttpRequest) -> HttpResponse:
        """Campaign KPIs (docs/kpis.md#campaign-kpis)."""
        view = await self.engine.campaigns.get(request.params["campaign_id"])
        return json_response(await campaign_stats(self.engine.runtime, view))

    # -- flash sale ----------------------------------------------------------------------------

    async def reserve(self, request: HttpRequest) -> HttpResponse:
        """Reserve units of a flash-sale item: a held order until paid or expired."""
        body = self._body(request, s.ReserveIn)
        held = await self.engine.flash.reserve(
            request.params["campaign_id"],
            body.user_id,
            body.sku,
            body.qty,
            body.idempotency_key,
        )
        return json_response(s.ReservationOut.of(held.order, replayed=held.replayed), 201)

    async def pay(self, request: HttpRequest) -> HttpResponse:
        """Pay a held order (the same payment_ref again is a no-op; a payment_ref pays one
        order; amount, when sent, must be the order's)."""
        body = self._body(request, s.PayIn)
        order_id = request.params["order_id"]
        order = await self.engine.orders.pay(order_id, body.user_id, body.payment_ref, body.amount)
        return json_response(s.OrderOut.of(order))

    async def cancel(self, request: HttpRequest) -> HttpResponse:
        """Cancel a held order; its units return to stock."""
        body = self._body(request, s.CancelIn)
        order = await self.engine.orders.cancel(request.params["order_id"], body.user_id)
        return json_response(s.OrderOut.of(order))

    async def refund(self, request: HttpRequest) -> HttpResponse:
        """After-sale refund of a paid order (admin), with or without restock."""
        body = self._body(request, s.RefundIn)
        order = await self.engine.orders.refund(request.params["order_id"], body.restock)
        return json_response(s.OrderOut.of(order))

    async def get_order(self, request: HttpRequest) -> HttpResponse:
        """One order; the gateway names the user (?user_id=), who must own it."""
        order_id = request.params["order_id"]
        viewer = self._query_id(request, "user_id", required=not self._is_admin(request))
        return json_response(s.OrderOut.of(await self.engine.orders.get(order_id, viewer)))

    async def user_orders(self, request: HttpRequest) -> HttpResponse:
        """A user's orders from the durable store, newest first, with their type."""
        limit = self._query_int(request, "limit", 50, 1, 100)
        orders = await self.engine.orders.of_user(request.params["user_id"], limit)
        return json_response(s.OrdersOut([s.OrderOut.of(o) for o in orders]))

    # -- teams ---------------------------------------------------------------------------------

    async def open_team(self, request: HttpRequest) -> HttpResponse:
        """Open a team: the leader holds a seat; paying opens the team to joiners."""
        body = self._body(request, s.OpenTeamIn)
        seat = await self.engine.teams.open(
            request.params["campaign_id"],
            body.user_id,
            body.sku,
            body.qty,
            body.idempotency_key,
        )
        return json_response(s.SeatOut.of(seat), 201)

    async def join(self, request: HttpRequest) -> HttpResponse:
        """Take a seat in an open team (held until paid)."""
        body = self._body(request, s.JoinIn)
        seat = await self.engine.teams.join(
            request.params["team_id"], body.user_id, body.idempotency_key
        )
        return json_response(s.SeatOut.of(seat), 201)

    async def quick_join(self, request: HttpRequest) -> HttpResponse:
        """Join the best open team of the sku, or open a new one."""
        body = self._body(request, s.QuickJoinIn)
        seat = await self.engine.teams.quick_join(
            request.params["campaign_id"], body.user_id, body.sku, body.idempotency_key
        )
        return json_response(s.SeatOut.of(seat), 201)

    async def joinable(self, request: HttpRequest) -> HttpResponse:
        """Open teams of a sku with free seats, for the product page."""
        sku = self._query_id(request, "sku", required=True)
        assert sku is not None
        teams = await self.engine.teams.joinable(
            request.params["campaign_id"],
            sku,
            self._query_id(request, "viewer"),
            self._query_int(request, "limit", 20, 1, 100),
        )
        return json_response(s.TeamsOut([s.TeamOut.of(t) for t in teams]))

    async def team_view(self, request: HttpRequest) -> HttpResponse:
        """The share view of one team, for the viewer."""
        view = await self.engine.teams.view(
            request.params["team_id"], self._query_id(request, "viewer")
        )
        return json_response(s.ShareOut.of(view))

    async def team_orders(self, request: HttpRequest) -> HttpResponse:
        """The orders of one team (admin)."""
        team_id = request.params["team_id"]
        orders = await self.engine.teams.orders(team_id)
        return json_response(s.OrdersOut([s.OrderOut.of(o) for o in orders]))

    # -- operations ----------------------------------------------------------------------------

    async def healthz(self, request: HttpRequest) -> HttpResponse:
        """Liveness: the process answers."""
        return json_response(s.Health("ok"))

    async def readyz(self, request: HttpRequest) -> HttpResponse:
        """Readiness: Redis and SQL reachable, scripts loaded; each check "ok" or
        "unavailable" (what failed goes to the log, not to this answer without a token)."""
        checks = await self._readiness.get()
        ready = all(v == "ok" for v in checks.values())
        return json_response(
            s.Health("ok" if ready else "unavailable", checks), 200 if ready else 503
        )

    async def batch(self, request: HttpRequest) -> HttpResponse:
        """Many reservations, team opens, joins, quick-joins and payments in one request: one
        result per item, in order, each the single call's status and body
        (engine/api/batch.py)."""
        items = batch.decode(self._raw(request))
        done = await batch.execute(self.engine, items, error_body, self._failed)
        return json_response(done)

    async def live_figures(self, request: HttpRequest) -> HttpResponse:
        """Every figure of the live sale page, cumulative (engine/api/live.py)."""
        return json_response(await live.snapshot(self.engine), headers=_NO_STORE)

    async def live_page(self, request: HttpRequest) -> HttpResponse:
        """The live sale page; it asks for the admin token and polls GET /v1/live."""
        page = live.asset("live.html")
        return HttpResponse(200, page, b"text/html; charset=utf-8", _PAGE_HEADERS)

    async def live_asset(self, request: HttpRequest) -> HttpResponse:
        """The live page's script and style sheet."""
        name = request.params["asset"]
        media = _ASSETS.get(name)
        if media is None:
            raise ApiError("not_found", f"no route {request.path}")
        return HttpResponse(200, live.asset(name), media, _PAGE_HEADERS)

    async def metrics(self, request: HttpRequest) -> HttpResponse:
        """Prometheus metrics."""
        body = metrics.render(await self._dependencies.get())
        return HttpResponse(200, body, metrics.CONTENT_TYPE.encode())

    async def _probe_readiness(self) -> dict[str, str]:
        return await self.engine.readiness(PROBE_TIMEOUT)

    async def _probe_dependencies(self) -> list[str]:
        return await metrics.dependencies(self.engine.runtime, PROBE_TIMEOUT)

    async def openapi(self, request: HttpRequest) -> HttpResponse:
        """This document."""
        if self._openapi is None:
            self._openapi = _encoder.encode(openapi_document(self.operations))
        return HttpResponse(200, self._openapi)


async def _within(
    task: asyncio.Future[HttpResponse], seconds: float, *, pays: bool
) -> HttpResponse:
    """The answer of ``task``, or Unavailable when it has none within ``seconds`` (Redis or
    SQL stalled): the task goes on, and whatever it did is found by a retry with the same
    idempotency key or payment reference. For a payment (``pays``) that is PaymentPending:
    it may be recorded already, so its outcome is not known yet, never declined."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), seconds)
    except TimeoutError:
        task.add_done_callback(_late)
        late = errors.PaymentPending if pays else errors.Unavailable
        raise late(
            f"Redis or SQL did not answer within {seconds:g} s: retry with the same "
            "idempotency key or payment reference"
        ) from None


def _late(task: asyncio.Future[HttpResponse]) -> None:
    """The end of a request answered 503 for taking too long: a bug it met is logged."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if not isinstance(exc, errors.EngineError):
            log.error("a request answered 503 after the timeout failed", exc_info=exc)


async def _echo(request: HttpRequest) -> HttpResponse:
    """The T2 benchmark's baseline: the same server, decode JSON and send it back (no token,
    no engine, no metrics)."""
    try:
        body = msgspec.json.decode(request.body)
    except msgspec.DecodeError as exc:
        return error_response(errors.ValidationError(f"not JSON: {exc}"))
    return HttpResponse(200, _encoder.encode(body))


def create_app(settings: Settings | None = None) -> AsgiAdapter:
    """The API as an ASGI app on settings from the environment, for an ASGI server's factory
    (``uvicorn --factory engine.api.app:create_app``); `flashteam serve` uses its own server."""
    return Api(settings or Settings.from_env()).app
