"""HTTP requests and responses as the API sees them, the router that maps one to its handler,
and an ASGI adapter so the same handlers run under any ASGI server or test client.

flashteam serves HTTP with its own server (engine/api/server.py): a request arrives whole
(``HttpRequest``: method, path, raw query, lower-case headers, the body read within the size
cap) and its answer leaves whole (``HttpResponse``), written with one ``transport.write``.
There is no middleware stack: the router picks the handler in a dict lookup and a few segment
comparisons, and the handler (engine/api/app.py) does the rest.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from engine.errors import ValidationError

Headers = list[tuple[bytes, bytes]]


def find_header(headers: Headers, name: bytes) -> bytes | None:
    """The first of ``headers`` named ``name`` (lower case), None when absent."""
    for key, value in headers:
        if key == name:
            return value
    return None


@dataclass(slots=True)
class HttpRequest:
    """One request, read whole. ``too_large``: its body went over the cap and was dropped."""

    method: str
    path: str
    query: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    too_large: bool = False
    params: dict[str, str] = field(default_factory=dict)  # the path's {parameters}
    _query: dict[str, str] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first header ``name`` (lower case), None when absent."""
        return find_header(self.headers, name)

    def query_param(self, name: str) -> str | None:
        """The ``name=`` of the query string, decoded; None when absent. A name given twice
        is a ValidationError: one reading of every input, whichever one a gateway in front
        would have taken."""
        if self._query is None:
            pairs = parse_qsl(self.query.decode("latin-1"), keep_blank_values=True)
            query: dict[str, str] = {}
            for key, value in pairs:
                if key in query:
                    raise ValidationError(f"the query names {key!r} twice", field=key)
                query[key] = value
            self._query = query
        return self._query.get(name)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One answer: status, body, its media type and any other headers. A header name or
    value with CR or LF is refused here (ValueError): nothing a handler puts in a header can
    split the answer."""

    status: int
    body: bytes
    media_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __post_init__(self) -> None:
        for part in (self.media_type, *(p for header in self.headers for p in header)):
            if b"\r" in part or b"\n" in part:
                raise ValueError(f"a response header may not hold CR or LF: {part!r}")


def refusal(status: int, code: str, message: str, retry_after: int = 0) -> HttpResponse:
    """An error answer built once: the error body, and ``Retry-After`` when given."""
    body = b'{"error":{"code":"%s","message":"%s"}}' % (code.encode(), message.encode())
    headers = ((b"retry-after", b"%d" % retry_after),) if retry_after else ()
    return HttpResponse(status, body, headers=headers)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}


_date = (0, b"")  # (the second, its Date header line)


def date_line() -> bytes:
    """The ``date:`` header line of this second (formatted once a second)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode())
    return _date[1]


def serialize(response: HttpResponse, keep_alive: bool, head: bool = False) -> bytes:
    """The bytes of the response on the wire (no body for HEAD), ready for one write."""
    status = response.status
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()
    body = response.body
    parts = [
        line,
        date_line(),
        b"content-type: ",
        response.media_type,
        b"\r\ncontent-length: %d\r\n" % len(body),
    ]
    for name, value in response.headers:
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(body)
    return b"".join(parts)


class NoRoute(Exception):
    """Raised by ``Router.resolve`` when no route has the path (``allowed`` empty) or none
    takes the method (``allowed``: the methods that would)."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        super().__init__()
        self.allowed = sorted(set(allowed))


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    segments: tuple[str | None, ...]  # literal segments, None where a parameter goes
    names: tuple[str, ...]  # the parameter names, in order
    handler: Handler


class Router:
    """Routes by method and path template (``/v1/orders/{order_id}/pay``): routes are grouped
    by their number of segments; within a group, literal segments must match and the others
    become ``request.params``.

    A resolved path is kept when every parameter of its route is one of ``cache_params``:
    ids that are few and long-lived (a campaign's), so a hot path (one campaign's
    reservations) is resolved once, then looked up. Paths with an order, team or user id are
    new in nearly every request: keeping them would only churn the cache."""

    CACHED = 4096  # resolved (method, path) pairs kept; the cache starts over when full

    def __init__(self, cache_params: frozenset[str] = frozenset()) -> None:
        self._by_length: dict[int, list[_Route]] = {}
        self._cache_params = cache_params
        self._resolved: dict[tuple[str, str], tuple[Handler, dict[str, str]]] = {}

    def add(self, method: str, template: str, handler: Handler) -> None:
        parts = template.split("/")
        segments = tuple(None if p.startswith("{") else p for p in parts)
        names = tuple(p[1:-1] for p in parts if p.startswith("{"))
        self._by_length.setdefault(len(parts), []).append(_Route(method, segments, names, handler))

    def resolve(self, request: HttpRequest) -> Handler:
        """The handler of the request, with ``request.params`` filled; NoRoute otherwise."""
        key = (request.method, request.path)
        known = self._resolved.get(key)
        if known is not None:
            request.params = known[1]
            return known[0]
        route = self._resolve(request)
        if self._cache_params.issuperset(route.names):
            if len(self._resolved) >= self.CACHED:
                self._resolved.clear()
            self._resolved[key] = (route.handler, request.params)
        return route.handler

    def _resolve(self, request: HttpRequest) -> _Route:
        parts = request.path.split("/")
        allowed: list[str] = []
        for route in self._by_length.get(len(parts), ()):
            values = _match(route.segments, parts)
            if values is None:
                continue
            if route.method != request.method:
                allowed.append(route.method)
                continue
            request.params = dict(zip(route.names, values, strict=True))
            return route
        raise NoRoute(allowed)


def _match(segments: tuple[str | None, ...], parts: list[str]) -> list[str] | None:
    values = []
    for literal, part in zip(segments, parts, strict=True):
        if literal is not None:
            if literal != part:
                return None
        elif part:
            values.append(part)
        else:
            return None  # an empty parameter: no route
    return values


# --------------------------------------------------------------------------- ASGI


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Lifespan = Callable[[], Awaitable[None]]


class AsgiAdapter:
    """The same handler as an ASGI application (uvicorn, granian, httpx's ASGITransport):
    the body read within ``max_body``, the answer sent as one start and one body message;
    the lifespan runs ``startup`` and ``shutdown``."""

    def __init__(
        self, handler: Handler, max_body: int, startup: Lifespan, shutdown: Lifespan
    ) -> None:
        self._handler = handler
        self._max_body = max_body
        self._startup = startup
        self._shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = HttpRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b""),
            headers=[(k.lower(), v) for k, v in scope.get("headers", [])],
        )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                request.too_large = True
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        request.body = b"".join(chunks)
        response = await self._handler(request)
        headers = [
            (b"content-type", response.media_type),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
