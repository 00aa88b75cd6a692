"""The load generator of the T2 HTTP benchmark (bench/test_http.py), the same for every system.

``wrk`` when it is on PATH (``BENCH_LOADGEN=asyncio`` forces the fallback): one Lua script for
every system and route, 64 keep-alive connections on one thread, each request a new shopper
(user id ``<tag>-<thread>-<n>``, the same JSON body shape everywhere). With ``batch`` > 0 a
request is a ``POST /v1/batch`` of that many reserve items, each its own shopper, and every
answer's items are counted: those answered and those answered 201. ``pause_ms`` makes each
connection wait between requests (a paced run). Without wrk, an asyncio HTTP/1.1 client in a
separate process does the same.

Either way the generator shares the machine with what it measures, so only ratios measured
the same way in the same run mean anything.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from engine.local.launcher import TEST_GATEWAY_TOKEN as GATEWAY

CONNECTIONS = 64
# A batch answer's items (engine/api/batch.py: BatchResult, its fields in order), and those
# that reserved.
BATCH_ITEM, BATCH_OK = '{"status":', '{"status":201,'

# done() prints the figures as one JSON line; a batch's answers are read for their items:
# `seen` counts the items answered, `reserved` those answered 201.
WRK_SCRIPT = r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  path, sku, tag, campaign = args[1], args[2], args[3], args[6]
  local pause = tonumber(args[5])
  batch = tonumber(args[7])
  prefix = tag .. "-" .. tid .. "-"
  n, seen, reserved = 0, 0, 0
  wrk.headers["Authorization"] = "Bearer " .. args[4]
  wrk.headers["Content-Type"] = "application/json"
  if pause > 0 then
    delay = function() return pause end
  end
  if batch > 0 then
    response = function(status, headers, body)
      local _, answered = string.gsub(body, '{"status":', "")
      local _, ok = string.gsub(body, '{"status":201,', "")
      seen, reserved = seen + answered, reserved + ok
    end
  end
end

local function reservation(op)
  n = n + 1
  return string.format(
    '{%s"user_id":"%s%d","sku":"%s","qty":1,"idempotency_key":"k"}', op, prefix, n, sku)
end

function request()
  if batch == 0 then
    return wrk.format("POST", path, nil, reservation(""))
  end
  local items, op = {}, string.format('"op":"reserve","campaign_id":"%s",', campaign)
  for i = 1, batch do
    items[i] = reservation(op)
  end
  return wrk.format("POST", path, nil, '{"requests":[' .. table.concat(items, ",") .. ']}')
end

function done(summary, latency, requests)
  local e, seen_all, reserved_all = summary.errors, 0, 0
  for _, thread in ipairs(threads) do
    seen_all = seen_all + thread:get("seen")
    reserved_all = reserved_all + thread:get("reserved")
  end
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"seconds":%f,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_ms":%f,"p99_ms":%f,"items":%d,"items_201":%d}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, seen_all, reserved_all))
end
"""


@dataclass(frozen=True, slots=True)
class Load:
    """One run: completed requests, by outcome, and their latency percentiles."""

    requests: int
    seconds: float
    ok: int  # 2xx answers
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    items: int = 0  # batch requests: the items their answers hold
    items_201: int = 0  # ... and those answered 201 (reserved)

    @property
    def rate(self) -> float:
        """HTTP requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Route:
    """Where the load goes: a route of a server, the item the bodies name, and for a batch
    route its campaign and the reservations per request."""

    url: str
    path: str
    sku: str
    campaign: str = "-"
    batch: int = 0

    @property
    def per_request(self) -> int:
        """Reservations one request asks for."""
        return max(self.batch, 1)


class LoadGenerator:
    """wrk (or the asyncio fallback) with the script in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.script = folder / "t2.lua"
        self.script.write_text(WRK_SCRIPT)
        wanted = os.environ.get("BENCH_LOADGEN", "wrk") == "wrk"
        self.wrk = wanted and shutil.which("wrk") is not None

    @property
    def name(self) -> str:
        return f"{'wrk' if self.wrk else 'asyncio'} c{CONNECTIONS}"

    def measure(self, route: Route, seconds: float, pause_ms: int = 0) -> Load:
        """One run of ``seconds`` against ``route``, every user id new."""
        tag = uuid.uuid4().hex[:10]
        if self.wrk:
            return _wrk(self.script, route, tag, seconds, pause_ms)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(_generate, route, tag, seconds, pause_ms).result(seconds + 60)


def _wrk(script: Path, route: Route, tag: str, seconds: float, pause_ms: int) -> Load:
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
    command += ["--timeout", "10s", "-s", str(script), route.url + route.path, "--"]
    command += [route.path, route.sku, tag, GATEWAY, str(pause_ms), route.campaign]
    command.append(str(route.batch))
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    assert done.returncode == 0, done.stderr
    found = re.search(r"^WRK_RESULT (.*)$", done.stdout, re.MULTILINE)
    assert found is not None, done.stdout + done.stderr
    figures = json.loads(found[1])
    requests = int(figures["requests"])
    return Load(
        requests=requests,
        seconds=float(figures["seconds"]),
        ok=requests - int(figures["status_errors"]),
        non_2xx=int(figures["status_errors"]),
        socket_errors=int(figures["socket_errors"]),
        p50_ms=float(figures["p50_ms"]),
        p99_ms=float(figures["p99_ms"]),
        items=int(figures["items"]),
        items_201=int(figures["items_201"]),
    )


# --------------------------------------------------------------------------- asyncio fallback


def _generate(route: Route, tag: str, seconds: float, pause_ms: int) -> Load:
    import uvloop

    return uvloop.run(_drive(route, tag, seconds, pause_ms))


def _body(route: Route, tag: str, c: int, n: int) -> bytes:
    """Request ``n`` of connection ``c``: one reservation, or a batch of them."""
    if not route.batch:
        return (
            f'{{"user_id":"{tag}-{c}-{n}","sku":"{route.sku}","qty":1,"idempotency_key":"k"}}'
        ).encode()
    items = ",".join(
        f'{{"op":"reserve","campaign_id":"{route.campaign}","user_id":"{tag}-{c}-{n}-{i}",'
        f'"sku":"{route.sku}","qty":1,"idempotency_key":"k"}}'
        for i in range(route.batch)
    )
    return f'{{"requests":[{items}]}}'.encode()


async def _drive(route: Route, tag: str, seconds: float, pause_ms: int) -> Load:
    host, port = route.url.removeprefix("http://").split(":")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors, items = [0], Counter[str]()
    started = time.perf_counter()
    deadline = started + seconds
    head = (
        f"POST {route.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {GATEWAY}\r\nContent-Type: application/json\r\n"
    )

    async def connection(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        n = 0
        try:
            while time.perf_counter() < deadline:
                n += 1
                body = _body(route, tag, c, n)
                sent = time.perf_counter()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                answer = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", answer)
                content = await reader.readexactly(int(length[1]) if length else 0)
                latencies.append(time.perf_counter() - sent)
                statuses[int(answer[9:12])] += 1
                if route.batch:
                    items["seen"] += content.count(BATCH_ITEM.encode())
                    items["201"] += content.count(BATCH_OK.encode())
                if pause_ms:
                    await asyncio.sleep(pause_ms / 1000)
        except (OSError, asyncio.IncompleteReadError):
            errors[0] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(c) for c in range(CONNECTIONS)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    ok = sum(count for status, count in statuses.items() if 200 <= status < 300)
    return Load(
        requests=len(latencies),
        seconds=elapsed,
        ok=ok,
        non_2xx=len(latencies) - ok,
        socket_errors=errors[0],
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        items=items["seen"],
        items_201=items["201"],
    )


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
