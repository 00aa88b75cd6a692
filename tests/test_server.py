"""flashteam's HTTP/1.1 server (engine/api/server.py) on the wire: raw loopback sockets
against the session's `flashteam serve` (two worker processes).

Keep-alive, pipelined requests answered in order, each answer in one piece with its length,
``Expect: 100-continue``, a chunked request body, a malformed request (400, then the
connection closes), a body over the cap (413), 404 and 405 with ``Allow``, a HEAD without a
body, ``Connection: close``; and a stop: SIGTERM lets the requests in flight finish and
refuses new connections afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

from engine.local.launcher import TEST_GATEWAY_TOKEN, ApiServer
from engine.local.redis_server import RedisServer

GW = f"Authorization: Bearer {TEST_GATEWAY_TOKEN}\r\n"


async def exchange(
    url: str, raw: bytes, answers: int = 1, within: float = 10
) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send ``raw`` on one connection and read ``answers`` responses: (status, headers, body)
    each, and whether the server closed the connection afterwards (an answer to HEAD has no
    body, whatever its length says)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    out = []
    try:
        async with asyncio.timeout(within):
            for _ in range(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {
                    k.lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = 0 if raw.startswith(b"HEAD") else int(headers["content-length"])
                body = await reader.readexactly(length) if length else b""
                out.append((status, headers, body))
            closed = await _closed(reader)
    finally:
        writer.close()
    return out, closed


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.3) == b""
    except TimeoutError:
        return False


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(api: ApiServer) -> None:
    paths = ["/healthz", "/nope", "/openapi.json", "/healthz"]
    raw = b"".join(request("GET", path) for path in paths)
    answers, closed = await exchange(api.url, raw, answers=4)
    assert [status for status, _, _ in answers] == [200, 404, 200, 200]
    assert not closed, "a keep-alive connection stays open"
    assert json.loads(answers[0][2]) == {"status": "ok", "checks": {}}
    assert json.loads(answers[1][2])["error"]["code"] == "not_found"
    assert json.loads(answers[2][2])["openapi"].startswith("3.1")
    for _, headers, body in answers:
        assert int(headers["content-length"]) == len(body)


async def test_each_answer_is_one_write(api: ApiServer) -> None:
    """The head and the body arrive together: one read after the request gets the whole
    answer (they were written in one piece; loopback delivers one write as one segment)."""
    host, port = api.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for _ in range(20):
            writer.write(request("GET", "/healthz"))
            await writer.drain()
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            head, _, body = chunk.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head)[1])  # type: ignore[index]
            assert len(body) == length, chunk
    finally:
        writer.close()


async def test_expect_continue_chunked_bodies_and_connection_close(api: ApiServer) -> None:
    body = b'{"user_id": "u1", "sku": "sku-1", "qty": 1, "idempotency_key": "k"}'
    raw = (
        b"POST /v1/campaigns/nobody/orders HTTP/1.1\r\nHost: t\r\n" + GW.encode()
        + b"Expect: 100-continue\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )  # fmt: skip
    host, port = api.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404 "), head  # the campaign does not exist
    finally:
        writer.close()
    chunked = (
        b"POST /bench/nothing HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    answers, _ = await exchange(api.url, chunked)
    assert answers[0][0] == 404  # read whole (chunked), then routed
    answers, closed = await exchange(
        api.url, request("GET", "/healthz", extra="Connection: close\r\n")
    )
    assert answers[0][0] == 200 and answers[0][1]["connection"] == "close" and closed


async def test_bad_requests(api: ApiServer) -> None:
    answers, closed = await exchange(api.url, b"NOT HTTP AT ALL\r\n\r\n")
    assert answers[0][0] == 400 and closed
    too_big = request("POST", "/v1/batch", b"x" * 70_000, extra=GW)
    answers, _ = await exchange(api.url, too_big)
    assert answers[0][0] == 413
    assert json.loads(answers[0][2])["error"]["code"] == "payload_too_large"
    answers, _ = await exchange(api.url, request("DELETE", "/v1/batch", extra=GW))
    assert answers[0][0] == 405 and answers[0][1]["allow"] == "POST"
    answers, _ = await exchange(api.url, request("HEAD", "/healthz"))
    status, headers, body = answers[0]
    assert status == 405 and body == b""  # no HEAD route; and a HEAD answer has no body
    assert int(headers["content-length"]) > 0


async def test_sigterm_finishes_requests_in_flight_then_stops(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis_server:
        server = ApiServer(redis_server.url, tmp_path / "api", workers=1)
        with server:
            # A pipelined burst in flight when SIGTERM arrives: every request answered.
            raw = b"".join(request("GET", "/readyz") for _ in range(30))
            host, port = server.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(raw)
            await writer.drain()
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            data = b""
            async with asyncio.timeout(15):
                while chunk := await reader.read(65536):
                    data += chunk
            writer.close()
            assert data.count(b"HTTP/1.1 200 OK") == 30, data[:500]
            started = time.monotonic()
            assert server.process.wait(20) == 0
            assert time.monotonic() - started < 15
            try:
                await asyncio.open_connection(host, int(port))
            except OSError:
                pass
            else:
                raise AssertionError("still accepting after the stop")
