"""flashteam's HTTP/1.1 server: uvloop and httptools, one ``transport.write`` per response,
several worker processes, a graceful stop (docs/http.md, docs/performance.md#t2-http-reserve).

Why its own server: on loopback a socket write costs about what a small handler does, and a
generic ASGI server writes each answer twice (its head, then its body) after passing it
through the framework's middleware. Here a request is parsed by httptools (the parser uvicorn
uses), read whole within ``FLASHTEAM_MAX_BODY``, handed to the API's router
(engine/api/http.py), and its answer is written in one piece. HTTP/1.1 keep-alive, pipelining
(answers in order), ``Expect: 100-continue`` and chunked request bodies are handled.

Hostile clients get nothing (docs/http.md#limits-and-timeouts): the head, its header count and
the URL are capped (431, 414); a head or a body that does not arrive in time answers 408; an
idle connection closes after ``FLASHTEAM_KEEP_ALIVE``; a client that stops reading its
answers is dropped after ``FLASHTEAM_WRITE_TIMEOUT`` and nothing more is read from it
meanwhile; read-ahead of pipelined requests is bounded; a worker holds at most
``FLASHTEAM_MAX_CONNECTIONS`` connections (503 ``overloaded`` beyond). Every refusal is
answered after the answers of the requests read before it, in order, then the connection
closes: the server shuts its side, discards what still arrives for ``LINGER`` seconds, and
closes (a client still sending then reads its answer instead of a reset). Upgrade and CONNECT
are refused before any handler runs.

Workers: each process binds its own listening socket to the same port with SO_REUSEPORT, so
the kernel spreads new connections evenly over them (one shared socket lets the first awake
process take most of them). The parent restarts a worker that dies; SIGTERM or SIGINT stops
them all: each stops accepting, finishes the requests it has, closes its connections and its
engine, within ``GRACE`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import resource
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import cast
from urllib.parse import unquote

import httptools
import uvloop

from engine.api.http import Handler, HttpRequest, HttpResponse, find_header, refusal, serialize
from engine.local.process import die_with_parent
from engine.settings import Settings

log = logging.getLogger(__name__)

GRACE = 10.0  # seconds a stopping worker waits for its requests in flight
LINGER = 2.0  # seconds a closing connection discards what the client still sends
MAX_PIPELINED = 16  # requests read ahead of their answers before reading pauses
SLICE = 2048  # bytes parsed at a time from a larger chunk, to stop at the read-ahead bound
# File descriptors a worker keeps for itself besides its clients: its Redis and SQL
# connections (engine/connection.py: up to 2 x 256 to Redis), logs, the listening socket.
FD_RESERVE = 640
_RESTART_PAUSE = 1.0

_BAD_REQUEST = refusal(400, "validation_error", "malformed HTTP request")
_NO_UPGRADE = refusal(
    400,
    "validation_error",
    "this server does not switch protocols (Upgrade) or open tunnels (CONNECT)",
)
_HEAD_TOO_LARGE = refusal(431, "headers_too_large", "the request head is too large")
_URL_TOO_LONG = refusal(414, "url_too_long", "the request URL is too long")
_TIMED_OUT = refusal(408, "request_timeout", "the request did not arrive in time")
_TOO_MANY_CONNECTIONS = refusal(
    503, "overloaded", "this worker holds all the connections it may: retry", retry_after=1
)
_INTERNAL = refusal(500, "internal", "internal error")

# What the connection is reading: nothing (between requests), a head, or a body.
_IDLE, _HEAD, _BODY = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may send and how long it may take (docs/http.md#limits-and-timeouts)."""

    max_body: int
    max_head: int
    max_headers: int
    max_url: int
    header_timeout: float
    body_timeout: float
    keep_alive: float
    write_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_body,
            settings.max_head,
            settings.max_headers,
            settings.max_url,
            settings.header_timeout,
            settings.body_timeout,
            settings.keep_alive,
            settings.write_timeout,
        )


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing: the request was refused."""


class Connections:
    """The worker's open connections, so a stop can close them, and the cap on them: a new
    connection over ``cap`` takes the place of the connection idle the longest (one between
    requests, or that sent nothing yet: a client reconnects when its idle connection closes),
    or is refused when none is idle."""

    def __init__(self, cap: int) -> None:
        self.open: set[HttpProtocol] = set()
        self.cap = cap
        self.stopping = False
        self._idle: dict[HttpProtocol, None] = {}  # idle connections, the oldest first
        self._none_left = asyncio.Event()

    def add(self, connection: HttpProtocol) -> bool:
        """Count a new connection; False when it is over the cap (it is refused)."""
        self.open.add(connection)
        if len(self.open) <= self.cap:
            return True
        if self._idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.close_when_idle()
            return True
        return False

    def idle(self, connection: HttpProtocol) -> None:
        self._idle.pop(connection, None)
        self._idle[connection] = None

    def busy(self, connection: HttpProtocol) -> None:
        self._idle.pop(connection, None)

    def discard(self, connection: HttpProtocol) -> None:
        self.open.discard(connection)
        self._idle.pop(connection, None)
        if self.stopping and not self.open:
            self._none_left.set()

    async def close_all(self, within: float) -> None:
        """Close idle connections now, the others once their answers are written; abort
        what is still open after ``within`` seconds."""
        self.stopping = True
        for connection in list(self.open):
            connection.close_when_idle()
        if self.open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_left.wait(), within)
        for connection in list(self.open):
            connection.abort()


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse within the limits, queue, answer in order, one write per
    answer."""

    def __init__(self, handler: Handler, limits: Limits, connections: Connections) -> None:
        self._handler = handler
        self._limits = limits
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        # Requests read and not answered yet, in order, each with its keep-alive; a refusal
        # is queued as its answer (and is the last entry: nothing more is read).
        self._queue: deque[tuple[HttpRequest | HttpResponse, bool]] = deque()
        self._queued_bytes = 0  # bodies of the queued requests
        self._serving = False
        self._reading = True  # False once the last request is queued: later bytes are dropped
        self._closing = False
        self._eof = False
        self._over_cap = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._write_timer: asyncio.TimerHandle | None = None
        # One timer: the idle, head or body deadline of what the connection is doing.
        self._phase = _IDLE
        self._began = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for: tuple[int, float] | None = None
        # The request being parsed; its head's size (``_whole``: this chunk counts whole).
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._head_size = 0
        self._whole = False
        self._unparsed = b""  # bytes read past the read-ahead bound, parsed when it has room

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._over_cap = not self._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        self._writable.set()
        for timer in (self._timer, self._write_timer):
            if timer is not None:
                timer.cancel()

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return  # the last request is queued (or the connection is closing): dropped
        if self._unparsed:  # reading is paused: this arrived before the pause took effect
            self._unparsed += data
            return
        if len(data) <= SLICE:
            self._parse(data)
        else:
            self._parse_slices(data)

    def _parse_slices(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time while the read-ahead has room; keep the rest for
        when it has room again (a client cannot queue thousands of tiny requests in a chunk)."""
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            if self._read_ahead_full():
                self._unparsed = bytes(view[start:])
                if self._transport is not None:
                    self._transport.pause_reading()
                return
            self._parse(view[start : start + SLICE])
            if not self._reading:
                return

    def _parse(self, data: bytes | memoryview) -> None:
        # A head in progress when the chunk arrives and still in progress after it: the whole
        # chunk counts towards its size (httptools keeps an unfinished header to itself);
        # otherwise its parts count as the parser hands them over.
        self._whole = self._phase == _HEAD
        began = self._began
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(_NO_UPGRADE)
        except httptools.HttpParserError:
            self._refuse(_BAD_REQUEST)  # nothing when a callback refused, or after the last
        if not self._reading or self._phase == _IDLE:
            return
        if self._whole and self._phase == _HEAD and self._began == began:
            self._head_size += len(data)
            if self._head_size > self._limits.max_head:
                self._refuse(_HEAD_TOO_LARGE)
                return
        self._arm_deadline()

    def eof_received(self) -> bool | None:
        """The client sent all it will: the answers still go out (the requests read ahead
        too), then the connection closes (at once when none is pending)."""
        self._eof = True
        if self._serving or self._queue:
            return True
        return None

    def pause_writing(self) -> None:
        """The client stopped reading: read nothing more from it, and drop it unless it
        reads again within ``write_timeout``."""
        self._writable.clear()
        if self._transport is not None:
            self._transport.pause_reading()
        self._write_timer = self._loop.call_later(self._limits.write_timeout, self.abort)

    def resume_writing(self) -> None:
        self._writable.set()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._resume_reading()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", [], [], 0
        self._head_size = 0
        self._phase, self._began = _HEAD, self._loop.time()
        self._connections.busy(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_for = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url:
            self._refuse(_URL_TOO_LONG)
            raise _Stop
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        if len(self._headers) > self._limits.max_headers:
            self._refuse(_HEAD_TOO_LARGE)
            raise _Stop
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        if not self._whole:  # the chunk where this head began: its parts are counted
            self._head_size += size
            if self._head_size > self._limits.max_head:
                self._refuse(_HEAD_TOO_LARGE)
                raise _Stop

    def on_headers_complete(self) -> None:
        self._phase, self._began = _BODY, self._loop.time()
        if self._over_cap:
            self._refuse(_TOO_MANY_CONNECTIONS)
            raise _Stop
        if self._parser.should_upgrade() or find_header(self._headers, b"upgrade") is not None:
            self._refuse(_NO_UPGRADE)
            raise _Stop
        length = find_header(self._headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body:
            self._size = self._limits.max_body + 1  # refused whole: its bytes are not kept
        elif (
            not self._serving  # never ahead of the answer of an earlier request
            and (find_header(self._headers, b"expect") or b"").lower() == b"100-continue"
        ):
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= self._limits.max_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        url = httptools.parse_url(self._url)
        path = url.path.decode("utf-8", "replace")
        request = HttpRequest(
            method=self._parser.get_method().decode(),
            path=unquote(path) if "%" in path else path,
            query=url.query or b"",
            headers=self._headers,
            body=b"".join(self._body),
            too_large=self._size > self._limits.max_body,
        )
        keep_alive = self._parser.should_keep_alive()
        self._queue.append((request, keep_alive))
        self._queued_bytes += len(request.body)
        self._start_serving()
        if not keep_alive:
            self._reading = False  # Connection: close: whatever follows is not a request
            raise _Stop
        if self._read_ahead_full() and self._transport is not None:
            self._transport.pause_reading()

    # -- refusals and deadlines

    def _refuse(self, response: HttpResponse) -> None:
        """Answer ``response`` after the requests already read, then close; read no more."""
        if not self._reading:
            return
        self._reading = False
        self._phase = _IDLE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_for = None
        self._queue.append((response, False))
        if self._transport is not None:
            self._transport.pause_reading()
        self._start_serving()

    def _arm_deadline(self) -> None:
        """Arm the deadline of the head or body being read (once per head and per body: a
        request that arrives whole arms no timer)."""
        key = (self._phase, self._began)
        if self._timer_for == key:
            return
        if self._timer is not None:
            self._timer.cancel()
        limit = self._limits.header_timeout if self._phase == _HEAD else self._limits.body_timeout
        self._timer = self._loop.call_at(self._began + limit, self._expired, key)
        self._timer_for = key

    def _arm_idle(self) -> None:
        self._phase, self._began = _IDLE, self._loop.time()
        self._connections.idle(self)
        if self._timer is not None:
            self._timer.cancel()
        key = (_IDLE, self._began)
        self._timer = self._loop.call_at(self._began + self._limits.keep_alive, self._expired, key)
        self._timer_for = key

    def _expired(self, key: tuple[int, float]) -> None:
        if key != (self._phase, self._began):
            return  # the connection moved on since
        self._timer = self._timer_for = None
        if self._phase != _IDLE:
            self._refuse(_TIMED_OUT)
        elif not self._serving and not self._queue:
            self._close()

    # -- answering

    def _start_serving(self) -> None:
        if not self._serving:
            self._serving = True
            self._loop.create_task(self._serve())

    def _read_ahead_full(self) -> bool:
        return len(self._queue) >= MAX_PIPELINED or self._queued_bytes > self._limits.max_body

    def _resume_reading(self) -> None:
        if (
            self._transport is None
            or not self._reading
            or self._closing
            or not self._writable.is_set()
            or self._read_ahead_full()
        ):
            return
        if self._unparsed:
            unparsed, self._unparsed = self._unparsed, b""
            self._parse_slices(unparsed)
            if self._unparsed or not self._reading or self._transport is None:
                return
        self._transport.resume_reading()

    async def _serve(self) -> None:
        try:
            while self._queue:
                item, keep_alive = self._queue.popleft()
                head = False
                if isinstance(item, HttpResponse):
                    response = item
                else:
                    self._queued_bytes -= len(item.body)
                    head = item.method == "HEAD"
                    try:
                        response = await self._handler(item)
                    except Exception:
                        log.exception("%s %s failed", item.method, item.path)
                        response = _INTERNAL
                if self._transport is None:
                    return
                # Stopping: the requests already read are answered, then the connection closes.
                keep_alive = keep_alive and not (self._connections.stopping and not self._queue)
                if not self._writable.is_set():
                    await self._writable.wait()
                self._write(serialize(response, keep_alive, head=head))
                if not keep_alive:
                    self._finish()
                    return
                self._resume_reading()
        finally:
            self._serving = False
        if self._closing or self._eof or self._connections.stopping:
            self._close()
        elif self._phase == _IDLE:
            self._arm_idle()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _finish(self) -> None:
        """The last answer is written: shut this side, discard what still arrives for up to
        ``LINGER`` seconds (so the client reads its answer, not a reset), then close."""
        transport = self._transport
        if transport is None:
            return
        self._reading = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_for = None
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._loop.call_later(LINGER, self._close)

    def close_when_idle(self) -> None:
        """Close now if no answer is pending, else after the pending ones (reading no more)."""
        self._closing = True
        if not self._serving and not self._queue:
            self._close()
        elif self._transport is not None:
            self._transport.pause_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


# --------------------------------------------------------------------------- one worker


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def connection_cap(wanted: int) -> int:
    """Raise this process's open-file soft limit to fit ``wanted`` connections besides
    ``FD_RESERVE``, up to the hard limit (a default soft limit of 1,024 fits a few hundred
    clients), and return how many connections it can hold: ``wanted``, or fewer when the hard
    limit leaves no room for them (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    target = needed if hard == resource.RLIM_INFINITY else min(max(soft, needed), hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    cap = max(16, min(wanted, soft - FD_RESERVE))
    if cap < wanted:
        log.warning(
            "the open-file limit (%d) fits %d connections per worker, not the %d of "
            "FLASHTEAM_MAX_CONNECTIONS: raise it (ulimit -n, LimitNOFILE=)",
            soft,
            cap,
            wanted,
        )
    return cap


def port_in_use(host: str, port: int) -> bool:
    """Whether a socket already listens on (host, port): ``_listen`` would share the port
    with it (SO_REUSEPORT) instead of failing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


async def serve_worker(settings: Settings, host: str, port: int) -> None:
    """One worker: the API on its engine, served on (host, port) until SIGTERM or SIGINT."""
    from engine.api.app import Api  # the server knows only the Handler interface otherwise

    api = Api(settings)
    await api.startup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connections = Connections(connection_cap(settings.max_connections))
    limits = Limits.of(settings)
    server = await loop.create_server(
        lambda: HttpProtocol(api.handle, limits, connections),
        sock=_listen(host, port),
        backlog=2048,
    )
    try:
        await stop.wait()
    finally:
        server.close()
        await connections.close_all(GRACE)
        await server.wait_closed()
        await api.shutdown()


def _worker_main(env: dict[str, str], host: str, port: int, level: int, parent: int) -> None:
    # A worker stops (gracefully: SIGTERM) with its parent, killed or not: no orphan keeps
    # serving the port beside the workers of a restarted `flashteam serve`.
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request above
        return
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(env)
    uvloop.run(serve_worker(settings, host, port))


# --------------------------------------------------------------------------- the parent


def run(settings: Settings, host: str, port: int, workers: int) -> int:
    """Serve the API with ``workers`` processes (this process alone when 1) until SIGTERM or
    SIGINT; a worker that dies is started again."""
    level = logging.getLogger().getEffectiveLevel()
    if workers == 1:
        uvloop.run(serve_worker(settings, host, port))
        return 0
    context = multiprocessing.get_context("spawn")
    env = settings.to_env()
    stopping = False

    def start() -> SpawnProcess:
        process = context.Process(
            target=_worker_main,
            args=(env, host, port, level, os.getpid()),
            name="flashteam-api",
        )
        process.start()
        return process

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    processes = [start() for _ in range(workers)]
    try:
        while not stopping:
            time.sleep(0.2)
            for n, process in enumerate(processes):
                if not process.is_alive() and not stopping:
                    code = process.exitcode
                    log.error("API worker %d exited (%s): starting it again", process.pid, code)
                    time.sleep(_RESTART_PAUSE)
                    processes[n] = start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_all(processes)
    return 0


def _stop_all(processes: list[SpawnProcess]) -> None:
    for process in processes:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE + 5
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
