"""Hostile HTTP clients over raw loopback sockets: what a flash sale's front door meets (huge
heads, slow heads and bodies, idle floods, clients that stop reading, pipelined garbage,
Upgrade and CONNECT). Each probe runs against any HTTP/1.1 server at (host, port) serving the
API (flashteam's own server, or uvicorn and granian through the ASGI adapter) and returns
what the server did; ``Probe.held`` says whether that is what a production front door does.

tests/test_hostile.py asserts every probe against flashteam's server with short timeouts;
``python -m bench.hostile`` runs them against each server for docs/performance.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

# What a probe allows a server beyond the timeouts it was given, before it counts as not
# holding.
SLACK = 3.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Seen:
    """What one probe saw: the answers in order, whether the server closed the connection,
    how long that took, and (``stops_reading``) the bytes the server left unread."""

    answers: list[Answer]
    closed: bool
    seconds: float
    unread: int = 0

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]


@dataclass(frozen=True)
class Probe:
    """One row of the suite: its name, what holding means, and the probe itself (given the
    address and the longest timeout the server was configured with)."""

    name: str
    expected: str
    run: Callable[[str, int, float], Coroutine[Any, Any, Seen]]
    held: Callable[[Seen], bool]


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def read_answers(
    reader: asyncio.StreamReader, count: int, within: float
) -> tuple[list[Answer], bool]:
    """Up to ``count`` answers within ``within`` seconds, then whether the connection closed
    (EOF or reset) within that time."""
    answers: list[Answer] = []
    try:
        async with asyncio.timeout(within):
            while len(answers) < count:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                if status == 100:
                    continue
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length)
                answers.append(Answer(status, headers, body))
            while await reader.read(65536):
                pass
            return answers, True
    except TimeoutError:
        return answers, False
    except (asyncio.IncompleteReadError, ConnectionError):
        return answers, True


async def exchange(host: str, port: int, raw: bytes, count: int = 1, within: float = 10) -> Seen:
    """Send ``raw``, read ``count`` answers and whether the server closes the connection."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        answers, closed = await read_answers(reader, count, within)
    except ConnectionError:
        answers, closed = [], True
    finally:
        writer.close()
    return Seen(answers, closed, time.monotonic() - started)


async def drip(host: str, port: int, head: bytes, raw: bytes, every: float, within: float) -> Seen:
    """Send ``head``, then ``raw`` one byte every ``every`` seconds until the server answers
    or closes (or ``within`` seconds pass): the status it answered with, if any, and whether
    it closed."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = socket.create_connection((host, port))
    sock.setblocking(False)
    received: bytes | None = None  # None: no answer nor end yet
    closed = False
    try:
        await loop.sock_sendall(sock, head)
        for n in range(len(raw)):
            if time.monotonic() - started > within:
                break
            await loop.sock_sendall(sock, raw[n : n + 1])
            # Wait, then look: a receive cancelled by a timeout can drop what it just read
            # (the answer, when it comes as the wait ends).
            await asyncio.sleep(every)
            with contextlib.suppress(BlockingIOError):
                received = sock.recv(65536)
                break
        while received:  # an answer: read on to the end (1 s at most)
            more = await asyncio.wait_for(loop.sock_recv(sock, 65536), 1)
            if not more:
                break
            received += more
        closed = received is not None
    except ConnectionError:
        closed = True
    except TimeoutError:
        closed = False  # answered, and the connection stayed open
    finally:
        sock.close()
    answers = []
    if received and received.startswith(b"HTTP/1."):
        answers.append(Answer(int(received.split(b" ", 2)[1]), {}, b""))
    return Seen(answers, closed, time.monotonic() - started)


def _refused(seen: Seen, statuses: set[int]) -> bool:
    """Refused with one of ``statuses`` (or closed without an answer), then closed."""
    return seen.closed and (not seen.answers or seen.answers[-1].status in statuses)


# --------------------------------------------------------------------------- the probes


async def big_header(host: str, port: int, patience: float) -> Seen:
    raw = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 1_048_576 + b"\r\n\r\n"
    return await exchange(host, port, raw, within=patience + SLACK)


async def many_headers(host: str, port: int, patience: float) -> Seen:
    headers = b"".join(b"X-H%d: v\r\n" % n for n in range(65_536))
    raw = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n"
    return await exchange(host, port, raw, within=patience + SLACK)


async def long_url(host: str, port: int, patience: float) -> Seen:
    raw = b"GET /healthz?" + b"q" * 65_536 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    return await exchange(host, port, raw, within=patience + SLACK)


async def slow_head(host: str, port: int, patience: float) -> Seen:
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: "
    return await drip(host, port, head, b"a" * 1000, 0.25, patience + SLACK)


async def slow_body(host: str, port: int, patience: float) -> Seen:
    head = b"POST /v1/batch HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
    return await drip(host, port, head, b"{" * 1000, 0.25, patience + SLACK)


async def idle(host: str, port: int, patience: float) -> Seen:
    return await exchange(host, port, b"", count=0, within=patience + SLACK)


async def pipelined_then_garbage(host: str, port: int, patience: float) -> Seen:
    raw = request("GET", "/healthz") * 2 + b"GARBAGE \x00\x01\r\n\r\n"
    return await exchange(host, port, raw, count=3, within=SLACK)


async def close_then_stray_bytes(host: str, port: int, patience: float) -> Seen:
    raw = request("GET", "/healthz", extra="Connection: close\r\n") + b"STRAY BYTES\r\n\r\n"
    return await exchange(host, port, raw, count=1, within=SLACK)


async def upgrade(host: str, port: int, patience: float) -> Seen:
    raw = request("GET", "/healthz", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n")
    return await exchange(host, port, raw, count=1, within=SLACK)


async def connect(host: str, port: int, patience: float) -> Seen:
    raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    return await exchange(host, port, raw, count=1, within=SLACK)


async def idle_flood(host: str, port: int, patience: float, connections: int = 1000) -> Seen:
    """``connections`` idle connections, then a real request on a new one: its answer (and
    the time it took, the flood excluded)."""
    flood: list[asyncio.StreamWriter] = []
    try:
        for _ in range(connections):
            try:
                flood.append((await asyncio.open_connection(host, port))[1])
            except OSError:
                break
        closing = request("GET", "/healthz", extra="Connection: close\r\n")
        return await exchange(host, port, closing, within=SLACK)
    finally:
        for writer in flood:
            writer.close()


async def stops_reading(host: str, port: int, patience: float) -> Seen:
    """Pipeline requests with large answers and read none: the server should stop reading
    (its socket's receive queue fills, ``server_unread``) and drop the connection after its
    write timeout. Seen: ``closed`` when the connection was dropped, no ``answers``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    raw = request("GET", "/openapi.json") * 40_000  # 2.4 MB of requests, ~1 GB of answers
    sent = 0
    started = time.monotonic()
    deadline = started + 1.5
    try:
        while sent < len(raw) and time.monotonic() < deadline:
            try:
                sent += sock.send(raw[sent : sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        unread = server_unread(port, sock.getsockname()[1])
        dropped = await _dropped(sock, patience + SLACK)
        return Seen([], dropped, time.monotonic() - started, unread)
    finally:
        sock.close()


async def _dropped(sock: socket.socket, within: float) -> bool:
    """Whether the server drops the connection within ``within`` s while the client does not
    read: the client's socket leaves the ESTABLISHED state (a reset, or the server's end)."""
    port = sock.getsockname()[1]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        row = _tcp_row(local=port)
        if row is None or row[3] != "01":  # 01: ESTABLISHED
            return True
        await asyncio.sleep(0.1)
    return False


def _tcp_row(local: int, remote: int | None = None) -> list[str] | None:
    """The row of Linux's /proc/net/tcp (or tcp6) of the connection from port ``local`` (to
    port ``remote``, when given): its fields, or None when there is none."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                mine, theirs = fields[1].split(":")[-1], fields[2].split(":")[-1]
                if int(mine, 16) == local and remote in (None, int(theirs, 16)):
                    return fields
    return None


def server_unread(server_port: int, client_port: int) -> int:
    """Bytes waiting in the server's receive queue on the connection from ``client_port``:
    > 0 when the server stopped reading."""
    row = _tcp_row(local=server_port, remote=client_port)
    return 0 if row is None else int(row[4].split(":")[1], 16)


async def date_header(host: str, port: int, patience: float) -> Seen:
    closing = request("GET", "/healthz", extra="Connection: close\r\n")
    return await exchange(host, port, closing, within=SLACK)


def _answered_in_order_then_refused(seen: Seen) -> bool:
    return seen.statuses[:2] == [200, 200] and _refused(seen, set(range(400, 500)))


PROBES = (
    Probe(
        "one header of 1 MiB",
        "431 (or 4xx), then closed",
        big_header,
        lambda s: _refused(s, {400, 413, 431}),
    ),
    Probe(
        "65,536 headers (~850 KB)",
        "431 (or 4xx), then closed",
        many_headers,
        lambda s: _refused(s, {400, 413, 431}),
    ),
    Probe(
        "URL of 64 KiB",
        "414 (or 4xx), then closed",
        long_url,
        lambda s: _refused(s, {400, 414, 431}),
    ),
    Probe(
        "head sent a byte every 0.25 s",
        "408 (or closed) within the header timeout",
        slow_head,
        lambda s: s.closed,
    ),
    Probe(
        "body sent a byte every 0.25 s",
        "408 (or closed) within the body timeout",
        slow_body,
        lambda s: s.closed,
    ),
    Probe(
        "connection that sends nothing", "closed within the idle timeout", idle, lambda s: s.closed
    ),
    Probe(
        "client that stops reading",
        "reading stops; dropped after the write timeout",
        stops_reading,
        lambda s: s.closed and s.unread > 0,
    ),
    Probe(
        "2 pipelined requests, then garbage",
        "200, 200, then 400 and closed",
        pipelined_then_garbage,
        _answered_in_order_then_refused,
    ),
    Probe(
        "Connection: close, then stray bytes",
        "200, then closed",
        close_then_stray_bytes,
        lambda s: s.statuses == [200] and s.closed,
    ),
    Probe(
        "Upgrade: websocket",
        "4xx before any handler runs",
        upgrade,
        lambda s: bool(s.answers) and 400 <= s.statuses[0] < 500,
    ),
    Probe("CONNECT", "4xx", connect, lambda s: bool(s.answers) and 400 <= s.statuses[0] < 500),
    Probe(
        "1,000 idle connections, then a request",
        "the request is answered 200 at once (within 1.5 s)",
        idle_flood,
        lambda s: s.statuses == [200] and s.seconds < SLACK / 2,
    ),
    Probe(
        "Date header",
        "every answer has one",
        date_header,
        lambda s: bool(s.answers) and "date" in s.answers[0].headers,
    ),
)
