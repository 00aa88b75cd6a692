"""The HTTP API for the storefront gateway (docs/http.md): Starlette routes over the engine,
msgspec for every body in and out.

Each handler is wrapped once by ``_endpoint``: it checks the bearer token (constant time),
reads the body under the size cap, turns every ``EngineError`` into the JSON error body with
its HTTP status, counts rejections for the campaign KPIs and records the request's latency
per route and outcome. A 500 means a bug, and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import Enum
from typing import Any, TypeVar, cast

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import errors
from engine.api import batch, live, metrics
from engine.api import schemas as s
from engine.api.openapi import Operation, openapi_document
from engine.core import Engine
from engine.keys import campaign_of_order, campaign_of_team, check_id
from engine.models import Campaign, CampaignKind, Item
from engine.settings import Settings
from engine.stats import CampaignStats, RejectionCounter, campaign_stats

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS: dict[str, int] = {
    "validation_error": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
}
CONFLICT = 409  # every other business rejection: sold_out, team_full, hold_expired, ...


_NO_STORE = {"Cache-Control": "no-store"}
# The live page and its assets: its own script and styles only, data from this origin only.
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_ASSETS = {"live.js": "text/javascript; charset=utf-8", "live.css": "text/css; charset=utf-8"}


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


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status, headers, media_type="application/json")


def error_body(exc: errors.EngineError) -> tuple[int, dict[str, Any]]:
    """An error's status and its body ``{"error": {"code", "message", ...details}}``."""
    code = exc.http_code if isinstance(exc, ApiError) else exc.code
    status = STATUS.get(code, CONFLICT if isinstance(exc, errors.Rejected) else 500)
    details = {k: v for k, v in exc.details.items() if k not in ("code", "message")}
    return status, {"error": {"code": code, "message": exc.message, **details}}


def error_response(exc: errors.EngineError) -> Response:
    status, body = error_body(exc)
    headers = None
    if isinstance(exc, errors.RateLimited):
        retry = max(1, int(float(exc.details.get("retry_after", 1)) + 0.999))
        headers = {"Retry-After": str(retry)}
    elif isinstance(exc, errors.Unavailable):
        headers = {"Retry-After": "1"}
    return json_response(body, status, headers)


class Api:
    """The routes over one Engine; ``app`` is the ASGI application."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        gateway, admin = settings.require_tokens()
        self._gateway = gateway.encode()
        self._admin = admin.encode()
        self._engine = engine
        self._rejections: RejectionCounter | None = None
        self._openapi: bytes | None = None
        self.operations: list[Operation] = []
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
            self._route("POST", "/v1/orders/{order_id}/pay", self.pay, gw, s.PayIn, o),
            self._route("POST", "/v1/orders/{order_id}/cancel", self.cancel, gw, s.CancelIn, o),
            self._route("POST", "/v1/orders/{order_id}/refund", self.refund, adm, s.RefundIn, o),
            self._route(
                "GET",
                "/v1/orders/{order_id}",
                self.get_order,
                gw,
                None,
                o,
                query=(("user_id", False),),
            ),
            self._route(
                "GET",
                "/v1/users/{user_id}/orders",
                self.user_orders,
                gw,
                None,
                s.OrdersOut,
                query=(("limit", False),),
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
        if settings.echo_route:
            routes.append(Route("/bench/echo", _echo, methods=["POST"]))
        self.app = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the engine opens in the app's lifespan"
        return self._engine

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        owned = self._engine is None
        if owned:
            self._engine = await Engine.open(self.settings)
        self.engine.runtime.scripts.observe = metrics.observe_script
        self._rejections = RejectionCounter(self.engine.runtime)
        stop = asyncio.Event()
        saver = asyncio.create_task(self._rejections.run(stop))
        try:
            yield
        finally:
            stop.set()
            await saver
            if owned:
                await self.engine.close()
                self._engine = None

    def _route(
        self,
        method: str,
        path: str,
        handler: Callable[[Request], Awaitable[Response]],
        access: Access,
        body: type | None,
        out: type | None,
        status: int = 200,
        query: tuple[tuple[str, bool], ...] = (),
    ) -> Route:
        """One route, recorded as an Operation for /openapi.json."""
        name = f"{method} {path}"
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

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            outcome = "ok"
            try:
                self._authorize(request, access)
                return await handler(request)
            except errors.EngineError as exc:
                outcome = exc.http_code if isinstance(exc, ApiError) else exc.code
                # Not for ids nobody created, nor for an archived campaign (its counters
                # are in SQL now, engine/archive.py).
                if isinstance(exc, errors.Rejected) and not isinstance(
                    exc, errors.NotFound | errors.Archived
                ):
                    self._count_rejection(request, outcome)
                return error_response(exc)
            except Exception:
                outcome = "internal"
                log.exception("%s failed", name)
                return error_response(errors.EngineError("internal error"))
            finally:
                metrics.observe_request(name, outcome, time.perf_counter() - started)

        return Route(path, endpoint, methods=[method], name=name)

    def _authorize(self, request: Request, access: Access) -> None:
        if access is Access.PUBLIC:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError("unauthorized", "send Authorization: Bearer <token>")
        given = token.strip().encode()
        if hmac.compare_digest(given, self._admin):
            return
        if access is Access.GATEWAY and hmac.compare_digest(given, self._gateway):
            return
        if access is Access.ADMIN and hmac.compare_digest(given, self._gateway):
            raise ApiError("forbidden", "this call needs the admin token")
        raise ApiError("unauthorized", "unknown token")

    async def _raw(self, request: Request) -> bytes:
        """The request body, within ``max_body``."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body:
            raise ApiError("payload_too_large", f"bodies are capped at {self.settings.max_body} B")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.settings.max_body:
                raise ApiError(
                    "payload_too_large", f"bodies are capped at {self.settings.max_body} B"
                )
        return raw

    async def _body(self, request: Request, kind: type[T]) -> T:
        raw = await self._raw(request)
        decoder = _decoders.get(kind)
        if decoder is None:
            decoder = _decoders[kind] = msgspec.json.Decoder(kind)
        try:
            return cast(T, decoder.decode(raw or b"{}"))
        except msgspec.ValidationError as exc:
            raise errors.ValidationError(str(exc)) from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise errors.ValidationError(f"the body is not valid UTF-8 JSON: {exc}") from exc

    def _count_rejection(self, request: Request, code: str) -> None:
        params = request.path_params
        with contextlib.suppress(errors.ValidationError):
            if "campaign_id" in params:
                campaign_id = check_id(params["campaign_id"], "campaign_id")
            elif "order_id" in params:
                campaign_id = campaign_of_order(params["order_id"])
            elif "team_id" in params:
                campaign_id = campaign_of_team(params["team_id"])
            else:
                return
            self._count(campaign_id, code)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError("not_found", f"no route {request.url.path}"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(ApiError("method_not_allowed", message))

    @staticmethod
    def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            raise errors.ValidationError(
                f"{name} must be an integer from {low} to {high}", field=name
            )
        return int(raw)

    @staticmethod
    def _query_id(request: Request, name: str, required: bool = False) -> str | None:
        raw = request.query_params.get(name)
        if raw is None:
            if required:
                raise errors.ValidationError(f"{name} is required", field=name)
            return None
        return check_id(raw, name)

    def _is_admin(self, request: Request) -> bool:
        token = request.headers.get("authorization", "").partition(" ")[2].strip().encode()
        return hmac.compare_digest(token, self._admin)

    # -- campaigns -----------------------------------------------------------------------------

    async def create_campaign(self, request: Request) -> Response:
        """Create a campaign (admin); it sells from starts_at."""
        body = await self._body(request, s.CampaignIn)
        campaign = Campaign(
            id=body.id,
            kind=CampaignKind(body.kind),
            title=body.title,
            starts_at=body.starts_at,
            ends_at=body.ends_at,
            items=tuple(Item(i.sku, i.price, i.stock) for i in body.items),
            per_user_limit=body.per_user_limit,
            hold_seconds=body.hold_seconds,
            team_size=body.team_size,
            team_ttl_seconds=body.team_ttl_seconds,
        )
        view = await self.engine.campaigns.create(campaign)
        return json_response(s.CampaignOut.of(view), 201)

    async def get_campaign(self, request: Request) -> Response:
        """A campaign: definition, status, live stock per item."""
        view = await self.engine.campaigns.get(request.path_params["campaign_id"])
        return json_response(s.CampaignOut.of(view))

    async def edit_campaign(self, request: Request) -> Response:
        """Edit a campaign (admin): any field while scheduled, a later ends_at while active."""
        body = await self._body(request, s.CampaignPatch)
        changes = body.changes()
        if not changes:
            raise errors.ValidationError("send at least one field to change")
        view = await self.engine.campaigns.update(request.path_params["campaign_id"], changes)
        return json_response(s.CampaignOut.of(view))

    async def invalidate(self, request: Request) -> Response:
        """Invalidate a campaign (admin): no new orders, holds cancelled, open teams fail."""
        view = await self.engine.campaigns.invalidate(request.path_params["campaign_id"])
        return json_response(s.CampaignOut.of(view))

    async def stats(self, request: Request) -> Response:
        """Campaign KPIs (docs/kpis.md#campaign-kpis)."""
        view = await self.engine.campaigns.get(request.path_params["campaign_id"])
        return json_response(await campaign_stats(self.engine.runtime, view))

    # -- flash sale ----------------------------------------------------------------------------

    async def reserve(self, request: Request) -> Response:
        """Reserve units of a flash-sale item: a held order until paid or expired."""
        body = await self._body(request, s.ReserveIn)
        held = await self.engine.flash.reserve(
            request.path_params["campaign_id"],
            body.user_id,
            body.sku,
            body.qty,
            body.idempotency_key,
        )
        return json_response(s.ReservationOut.of(held.order, replayed=held.replayed), 201)

    async def pay(self, request: Request) -> Response:
        """Pay a held order (the same payment_ref again is a no-op)."""
        body = await self._body(request, s.PayIn)
        order_id = request.path_params["order_id"]
        order = await self.engine.orders.pay(order_id, body.user_id, body.payment_ref)
        return json_response(s.OrderOut.of(order))

    async def cancel(self, request: Request) -> Response:
        """Cancel a held order; its units return to stock."""
        body = await self._body(request, s.CancelIn)
        order = await self.engine.orders.cancel(request.path_params["order_id"], body.user_id)
        return json_response(s.OrderOut.of(order))

    async def refund(self, request: Request) -> Response:
        """After-sale refund of a paid order (admin), with or without restock."""
        body = await self._body(request, s.RefundIn)
        order = await self.engine.orders.refund(request.path_params["order_id"], body.restock)
        return json_response(s.OrderOut.of(order))

    async def get_order(self, request: Request) -> Response:
        """One order; the gateway names the user (?user_id=), who must own it."""
        order_id = request.path_params["order_id"]
        viewer = self._query_id(request, "user_id", required=not self._is_admin(request))
        order = await self.engine.orders.get(order_id)
        if viewer is not None and order.user_id != viewer:
            raise errors.Forbidden("the order belongs to another user")
        return json_response(s.OrderOut.of(order))

    async def user_orders(self, request: Request) -> Response:
        """A user's orders from the durable store, newest first, with their type."""
        limit = self._query_int(request, "limit", 50, 1, 100)
        orders = await self.engine.orders.of_user(request.path_params["user_id"], limit)
        return json_response(s.OrdersOut([s.OrderOut.of(o) for o in orders]))

    # -- teams ---------------------------------------------------------------------------------

    async def open_team(self, request: Request) -> Response:
        """Open a team: the leader holds a seat; paying opens the team to joiners."""
        body = await self._body(request, s.OpenTeamIn)
        seat = await self.engine.teams.open(
            request.path_params["campaign_id"],
            body.user_id,
            body.sku,
            body.qty,
            body.idempotency_key,
        )
        return json_response(s.SeatOut.of(seat), 201)

    async def join(self, request: Request) -> Response:
        """Take a seat in an open team (held until paid)."""
        body = await self._body(request, s.JoinIn)
        seat = await self.engine.teams.join(
            request.path_params["team_id"], body.user_id, body.idempotency_key
        )
        return json_response(s.SeatOut.of(seat), 201)

    async def quick_join(self, request: Request) -> Response:
        """Join the best open team of the sku, or open a new one."""
        body = await self._body(request, s.QuickJoinIn)
        seat = await self.engine.teams.quick_join(
            request.path_params["campaign_id"], body.user_id, body.sku, body.idempotency_key
        )
        return json_response(s.SeatOut.of(seat), 201)

    async def joinable(self, request: Request) -> Response:
        """Open teams of a sku with free seats, for the product page."""
        sku = self._query_id(request, "sku", required=True)
        assert sku is not None
        teams = await self.engine.teams.joinable(
            request.path_params["campaign_id"],
            sku,
            self._query_id(request, "viewer"),
            self._query_int(request, "limit", 20, 1, 100),
        )
        return json_response(s.TeamsOut([s.TeamOut.of(t) for t in teams]))

    async def team_view(self, request: Request) -> Response:
        """The share view of one team, for the viewer."""
        view = await self.engine.teams.view(
            request.path_params["team_id"], self._query_id(request, "viewer")
        )
        return json_response(s.ShareOut.of(view))

    async def team_orders(self, request: Request) -> Response:
        """The orders of one team (admin)."""
        team_id = request.path_params["team_id"]
        orders = await self.engine.teams.orders(team_id)
        return json_response(s.OrdersOut([s.OrderOut.of(o) for o in orders]))

    # -- operations ----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process answers."""
        return json_response(s.Health("ok"))

    async def readyz(self, request: Request) -> Response:
        """Readiness: Redis and SQL reachable, scripts loaded."""
        checks = await self.engine.readiness()
        ready = all(v == "ok" for v in checks.values())
        return json_response(
            s.Health("ok" if ready else "unavailable", checks), 200 if ready else 503
        )

    async def batch(self, request: Request) -> Response:
        """Many reservations, team opens, joins, quick-joins and payments in one request: one
        result per item, in order, each the single call's status and body
        (engine/api/batch.py)."""
        items = batch.decode(await self._raw(request))
        done = await batch.execute(self.engine, items, error_body, self._count)
        return json_response(done)

    def _count(self, campaign_id: str, code: str) -> None:
        if self._rejections is not None:
            self._rejections.count(campaign_id, code)

    async def live_figures(self, request: Request) -> Response:
        """Every figure of the live sale page, cumulative (engine/api/live.py)."""
        return json_response(await live.snapshot(self.engine), headers=_NO_STORE)

    async def live_page(self, request: Request) -> Response:
        """The live sale page; it asks for the admin token and polls GET /v1/live."""
        return Response(live.asset("live.html"), 200, _PAGE_HEADERS, "text/html; charset=utf-8")

    async def live_asset(self, request: Request) -> Response:
        """The live page's script and style sheet."""
        name = request.path_params["asset"]
        media = _ASSETS.get(name)
        if media is None:
            raise ApiError("not_found", f"no route {request.url.path}")
        return Response(live.asset(name), 200, _PAGE_HEADERS, media)

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics."""
        body = await metrics.render(self.engine.runtime)
        return Response(body, 200, media_type=metrics.CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        """This document."""
        if self._openapi is None:
            self._openapi = _encoder.encode(openapi_document(self.operations))
        return Response(self._openapi, 200, media_type="application/json")


async def _echo(request: Request) -> Response:
    """The T2 benchmark's baseline: the same app and server, decode JSON and send it back."""
    body = msgspec.json.decode(await request.body())
    return Response(_encoder.encode(body), 200, media_type="application/json")


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app on settings from the environment (uvicorn's factory)."""
    return Api(settings or Settings.from_env()).app
