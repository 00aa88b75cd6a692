"""Hostile clients against flashteam's HTTP server over raw loopback sockets (testkit/hostile.py):
each limit and timeout of docs/http.md#limits-and-timeouts, answers in order before an error
closes the connection, bounded read-ahead for a client that stops reading, Upgrade refused
before any handler runs, a flood of idle connections that does not keep a real request out,
and the per-worker connection cap; and a hypothesis fuzz of malformed heads and bodies, each
answered 4xx or closed, never 500 nor left hanging, with the next client served.

The server runs with short timeouts (1 s) and a cap of 64 connections, so the suite takes
seconds; the same probes run against uvicorn and granian for docs/performance.md
(``python -m bench.hostile``).
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.api.http import HttpResponse, serialize
from engine.api.server import FD_RESERVE, connection_cap
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisServer
from testkit import hostile
from tests.test_api import GW, SKU, new_flash, ok, unique

GW_HEADER = "Authorization: " + GW["Authorization"]
HEALTH = hostile.request("GET", "/healthz", extra="Connection: close\r\n")
PATIENCE = 1.0  # every timeout of the server below
CAP = 64
LIMITS = {
    "header_timeout": "1",
    "body_timeout": "1",
    "keep_alive": "1",
    "write_timeout": "1",
    "max_connections": str(CAP),
}
# What flashteam answers each probe with, in order (none: closed without an answer).
STATUSES = {
    "one header of 1 MiB": [431],
    "65,536 headers (~850 KB)": [431],
    "URL of 64 KiB": [414],
    "head sent a byte every 0.25 s": [408],
    "body sent a byte every 0.25 s": [408],
    "connection that sends nothing": [],
    "client that stops reading": [],
    "2 pipelined requests, then garbage": [200, 200, 400],
    "Connection: close, then stray bytes": [200],
    "Upgrade: websocket": [400],
    "CONNECT": [400],
    "1,000 idle connections, then a request": [200],
    "Date header": [200],
}


@pytest.fixture(scope="module")
def strict(api_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One API worker with 1 s timeouts and a cap of 64 connections."""
    data = tmp_path_factory.mktemp("hostile")
    with ApiServer(api_redis.url, data, workers=1, extra=LIMITS) as server:
        yield server


@pytest.fixture
async def http(strict: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=strict.url, timeout=15, trust_env=False) as client:
        yield client


def address(server: ApiServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def test_every_probe_has_its_expected_answer() -> None:
    assert set(STATUSES) == {probe.name for probe in hostile.PROBES}


@pytest.mark.parametrize("probe", hostile.PROBES, ids=[p.name for p in hostile.PROBES])
async def test_the_server_holds(strict: ApiServer, probe: hostile.Probe) -> None:
    host, port = address(strict)
    seen = await probe.run(host, port, PATIENCE)
    assert seen.statuses == STATUSES[probe.name], seen
    assert probe.held(seen), seen
    for answer in seen.answers:
        if answer.body and answer.status >= 400:
            assert json.loads(answer.body)["error"]["code"], answer
    # The server serves the next client as before.
    after = await hostile.exchange(host, port, HEALTH, within=5)
    assert after.statuses == [200], after


async def test_refusals_carry_their_error_codes(strict: ApiServer) -> None:
    host, port = address(strict)
    codes = {}
    for name, probe in (
        ("431", hostile.big_header),
        ("414", hostile.long_url),
        ("400", hostile.upgrade),
    ):
        seen = await probe(host, port, PATIENCE)
        codes[name] = json.loads(seen.answers[0].body)["error"]["code"]
    assert codes == {
        "431": "headers_too_large",
        "414": "url_too_long",
        "400": "validation_error",
    }


async def test_pipelined_reservations_are_answered_before_the_garbage(
    strict: ApiServer, http: httpx.AsyncClient
) -> None:
    """Both reservations are made and answered 201, in order; then the garbage gets its 400
    and the connection closes."""
    campaign_id = await new_flash(http, "pipe")
    path = f"/v1/campaigns/{campaign_id}/orders"
    raw = b"".join(
        hostile.request("POST", path, json.dumps(body).encode(), extra=f"{GW_HEADER}\r\n")
        for body in (
            {"user_id": "u1", "sku": SKU, "qty": 1, "idempotency_key": "p1"},
            {"user_id": "u2", "sku": SKU, "qty": 1, "idempotency_key": "p2"},
        )
    )
    seen = await hostile.exchange(*address(strict), raw + b"\x00GARBAGE\r\n\r\n", count=3)
    assert seen.statuses == [201, 201, 400] and seen.closed, seen
    users = [json.loads(a.body)["user_id"] for a in seen.answers[:2]]
    assert users == ["u1", "u2"]


async def test_upgrade_and_connect_run_no_handler(
    strict: ApiServer, http: httpx.AsyncClient
) -> None:
    """A reservation sent with an Upgrade header is refused and not made: the same key,
    sent plainly afterwards, makes a new order (not a replay)."""
    campaign_id = await new_flash(http, "upgrade")
    body = {"user_id": "u1", "sku": SKU, "qty": 1, "idempotency_key": "up-1"}
    raw = hostile.request(
        "POST",
        f"/v1/campaigns/{campaign_id}/orders",
        json.dumps(body).encode(),
        extra=f"{GW_HEADER}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n",
    )
    seen = await hostile.exchange(*address(strict), raw)
    assert seen.statuses == [400] and seen.closed, seen
    made = ok(await http.post(f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW), 201)
    assert made["replayed"] is False


async def test_connection_close_with_trailing_bytes_runs_the_request_once(
    strict: ApiServer, http: httpx.AsyncClient
) -> None:
    campaign_id = await new_flash(http, "close")
    body = {"user_id": "u1", "sku": SKU, "qty": 1, "idempotency_key": unique("k")}
    raw = hostile.request(
        "POST",
        f"/v1/campaigns/{campaign_id}/orders",
        json.dumps(body).encode(),
        extra=f"{GW_HEADER}\r\nConnection: close\r\n",
    )
    seen = await hostile.exchange(*address(strict), raw + raw)  # the copy is stray bytes
    assert seen.statuses == [201] and seen.closed, seen
    assert seen.answers[0].headers["connection"] == "close"
    again = ok(await http.post(f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW), 201)
    assert again["replayed"] is True  # the first one made it; the stray copy was not run


async def test_over_the_cap_a_connection_is_refused_until_one_is_free(strict: ApiServer) -> None:
    """64 connections each in the middle of a head (not idle: none can be closed for a new
    one): the 65th is answered 503 overloaded with Retry-After; once they time out (408),
    a new connection is served."""
    host, port = address(strict)
    busy = []
    try:
        for _ in range(CAP):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nX-Partial: ")
            await writer.drain()
            busy.append(writer)
        await asyncio.sleep(0.1)  # every partial head read
        seen = await hostile.exchange(host, port, HEALTH, within=5)
        assert seen.statuses == [503] and seen.closed, seen
        assert seen.answers[0].headers["retry-after"] == "1"
        assert json.loads(seen.answers[0].body)["error"]["code"] == "overloaded"
    finally:
        for writer in busy:
            writer.close()
    for _ in range(50):
        seen = await hostile.exchange(host, port, HEALTH, within=5)
        if seen.statuses == [200]:
            break
        await asyncio.sleep(0.1)
    assert seen.statuses == [200], seen


def test_response_headers_cannot_carry_cr_or_lf() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        HttpResponse(200, b"{}", headers=((b"x-next", b"a\r\nSet-Cookie: b"),))
    with pytest.raises(ValueError, match="CR or LF"):
        HttpResponse(200, b"{}", media_type=b"text/plain\nx: y")
    wire = serialize(HttpResponse(200, b"{}"), keep_alive=True)
    date = re.search(rb"\r\ndate: (.*?)\r\n", wire)
    assert date is not None
    assert re.fullmatch(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT", date[1])


def test_the_worker_raises_its_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(4096, hard - FD_RESERVE) if hard != resource.RLIM_INFINITY else 4096
    assert connection_cap(wanted) == wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= min(wanted + FD_RESERVE, hard)
    assert soft <= resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- fuzzing

_LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""])
_TOKEN = st.one_of(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
    st.binary(min_size=0, max_size=12),
)
_TARGET = st.one_of(
    st.sampled_from([b"/healthz", b"/v1/batch", b"/v1/orders/x.o1/pay", b"*", b"/%zz", b""]),
    st.binary(max_size=40).map(lambda b: b"/" + b),
)
_VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"HTTX/1.1", b""])
_HEADER = st.one_of(
    st.tuples(
        st.sampled_from(
            [b"Content-Length", b"Transfer-Encoding", b"Host", b"Expect", b"Connection"]
        ),
        st.one_of(
            st.sampled_from([b"chunked", b"-1", b"99999999999999999999", b"5, 6", b"close"]),
            st.binary(max_size=20),
        ),
    ),
    st.tuples(st.binary(max_size=20), st.binary(max_size=40)),
)


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    """A request head and body built from parts that are often wrong: methods, targets,
    versions, line ends, header names and values with any byte, lengths that lie, chunked
    bodies of any shape; or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=1, max_size=300))
    end = draw(_LINE_ENDS)
    line = draw(_TOKEN) + b" " + draw(_TARGET) + b" " + draw(_VERSION) + end
    headers = b"".join(
        name + draw(st.sampled_from([b": ", b":", b" : ", b""])) + value + end
        for name, value in draw(st.lists(_HEADER, max_size=6))
    )
    return line + headers + end + draw(st.binary(max_size=100))


def _talk(host: str, port: int, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw``, shut the sending side, read to the end: what came back, and whether it
    ended (False: still open after the bound)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b"", True  # closed while sending: refused
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        except ConnectionError:
            pass
        return received, True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=malformed())
def test_malformed_requests_get_a_4xx_or_a_close_never_a_500_or_a_hang(
    strict: ApiServer, raw: bytes
) -> None:
    host, port = address(strict)
    received, ended = _talk(host, port, raw)
    assert ended, f"no end within 5 s for {raw!r}: {received[:200]!r}"
    statuses = [int(s) for s in re.findall(rb"(?:^|\r\n)HTTP/1\.1 (\d{3}) ", received)]
    assert all(status < 500 for status in statuses), (raw, received[:500])
    after, _ = _talk(host, port, hostile.request("GET", "/healthz"))
    assert after.startswith(b"HTTP/1.1 200 "), after[:200]
