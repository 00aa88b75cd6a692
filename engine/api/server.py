"""flashteam's HTTP/1.1 server: uvloop and httptools, one ``transport.write`` per response,
several worker processes, a graceful stop (docs/http.md, docs/performance.md#t2-http-reserve).

Why its own server: on loopback a socket write costs about what a small handler does, and a
generic ASGI server writes each answer twice (its head, then its body) after passing it
through the framework's middleware. Here a request is parsed by httptools (the parser uvicorn
uses), read whole within ``FLASHTEAM_MAX_BODY``, handed to the API's router
(engine/api/http.py), and its answer is written in one piece. HTTP/1.1 keep-alive, pipelining
(answers in order), ``Expect: 100-continue`` and chunked request bodies are handled; an idle
connection is closed after ``KEEP_ALIVE`` seconds.

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
import signal
import socket
import time
from collections import deque
from multiprocessing.context import SpawnProcess
from typing import cast
from urllib.parse import unquote

import httptools
import uvloop

from engine.api.http import Handler, HttpRequest, HttpResponse, find_header, serialize
from engine.settings import Settings

log = logging.getLogger(__name__)

KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open
GRACE = 10.0  # seconds a stopping worker waits for its requests in flight
MAX_PIPELINED = 64  # requests read ahead of their answers before reading pauses
_RESTART_PAUSE = 1.0
_BAD_REQUEST = HttpResponse(
    400, b'{"error":{"code":"validation_error","message":"malformed HTTP request"}}'
)


class Connections:
    """The worker's open connections, so a stop can close them."""

    def __init__(self) -> None:
        self.open: set[HttpProtocol] = set()
        self.stopping = False
        self._none_left = asyncio.Event()

    def add(self, connection: HttpProtocol) -> None:
        self.open.add(connection)

    def discard(self, connection: HttpProtocol) -> None:
        self.open.discard(connection)
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
    """One client connection: parse, queue, answer in order, one write per answer."""

    def __init__(self, handler: Handler, max_body: int, connections: Connections) -> None:
        self._handler = handler
        self._max_body = max_body
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[tuple[HttpRequest, bool]] = deque()  # (request, keep-alive)
        self._serving = False
        self._closing = False
        self._idle: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        self._writable.set()
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._write(serialize(_BAD_REQUEST, keep_alive=False))
            self._close()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", [], [], 0
        if self._idle is not None:
            self._idle.cancel()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        length = find_header(self._headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self._size = self._max_body + 1  # refused whole: its bytes are not kept
        elif (find_header(self._headers, b"expect") or b"").lower() == b"100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= self._max_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        path = url.path.decode("utf-8", "replace")
        request = HttpRequest(
            method=self._parser.get_method().decode(),
            path=unquote(path) if "%" in path else path,
            query=url.query or b"",
            headers=self._headers,
            body=b"".join(self._body),
            too_large=self._size > self._max_body,
        )
        self._queue.append((request, self._parser.should_keep_alive()))
        if len(self._queue) >= MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
        if not self._serving:
            self._serving = True
            self._loop.create_task(self._serve())

    # -- answering

    async def _serve(self) -> None:
        try:
            while self._queue:
                request, keep_alive = self._queue.popleft()
                response = await self._handler(request)
                if self._transport is None:
                    return
                # Stopping: the requests already read are answered, then the connection closes.
                keep_alive = keep_alive and not (self._connections.stopping and not self._queue)
                if not self._writable.is_set():
                    await self._writable.wait()
                self._write(serialize(response, keep_alive, head=request.method == "HEAD"))
                if not keep_alive:
                    self._close()
                    return
                reading = not self._closing and len(self._queue) < MAX_PIPELINED
                if self._transport is not None and reading:
                    self._transport.resume_reading()
        finally:
            self._serving = False
        if self._closing or self._connections.stopping:
            self._close()
        else:
            self._arm_idle()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(KEEP_ALIVE, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self._serving and not self._queue:
            self._close()

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
    connections = Connections()
    server = await loop.create_server(
        lambda: HttpProtocol(api.handle, settings.max_body, connections),
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


def _worker_main(env: dict[str, str], host: str, port: int, level: int) -> None:
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
            target=_worker_main, args=(env, host, port, level), name="flashteam-api"
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
