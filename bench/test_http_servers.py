"""T2: which HTTP server the API runs on: flashteam's own (engine/api/server.py, what
`flashteam serve` uses) against maintained ASGI servers running the same API
(``engine.api.app:create_app``): uvicorn (uvloop, httptools) and granian (Rust, ASGI).

The same configuration for each (the stripped one of bench/test_http.py: rate limit off, no
flush worker or reaper, the echo route on, 2 worker processes), on one redis-server and one
SQLite file, one server at a time; each measured on echo, reserve and sold-out with the same
wrk script (bench/http_load.py: 64 connections, every request a new shopper), in three rounds
that visit the servers in turn. Each row is a server's median round, with p50 and p99; the
ratio to flashteam's own server is the median of the same rounds' ratios. Correctness is
asserted (every echo 200, every reserve 201, every sold-out 409, the stock adds up). This is
how flashteam chose its server; `flashteam serve` keeps the fastest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from statistics import median
from typing import Any

import pytest
import redis

from bench import http_stacks as hs
from bench.harness import progress_line
from bench.http_load import CONNECTIONS, Load, LoadGenerator, Route
from bench.report import report
from engine.keys import keys_of
from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN
from engine.local.process import free_port
from engine.local.redis_server import RedisServer
from engine.settings import API_WORKERS, Settings

SECONDS = 4.0
WARMUP = 1.0
ROUNDS = 3
CAMPAIGN = "servers"
APP = "engine.api.app:create_app"
# How each candidate is started on a port (the API's settings come from the environment).
_WORKERS = str(API_WORKERS)
COMMANDS = {
    "flashteam": [sys.executable, "-m", "engine.cli", "serve", "--workers", _WORKERS],
    "uvicorn": [
        *(sys.executable, "-m", "uvicorn", APP, "--factory", "--workers", _WORKERS),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"),
    ],
    "granian": [
        *(sys.executable, "-m", "granian", APP, "--factory", "--interface", "asgi"),
        *("--workers", _WORKERS, "--loop", "uvloop", "--no-ws", "--log-level", "warning"),
    ],
}
ROUTES = ("echo", "reserve", "sold_out")


@contextmanager
def serving(name: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """The candidate ``name`` on a free port, until the block ends; its URL."""
    port = free_port()
    command = [*COMMANDS[name], "--port", str(port)]
    if name != "flashteam":
        command += ["--host", "127.0.0.1"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=hs.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            with suppress(OSError):
                if hs.call(url, "GET", "/healthz", None)[0] == 200:
                    break
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _routes(url: str) -> dict[str, Route]:
    return {
        "echo": Route(url, "/bench/echo", hs.HOT),
        "reserve": Route(url, f"/v1/campaigns/{CAMPAIGN}/orders", hs.HOT),
        "sold_out": Route(url, f"/v1/campaigns/{CAMPAIGN}/orders", hs.NONE),
    }


def _measure(redis_url: str, tmp: Path) -> tuple[dict[tuple[str, str], list[Load]], str]:
    settings = Settings(
        redis_url=redis_url,
        data_dir=tmp / "data",
        gateway_token=TEST_GATEWAY_TOKEN,
        admin_token=TEST_ADMIN_TOKEN,
        rate_limit=0,
        echo_route=True,
    )
    metrics_dir = tmp / "prometheus"
    metrics_dir.mkdir()
    env = os.environ | settings.to_env() | {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    generator = LoadGenerator(tmp)
    loads: dict[tuple[str, str], list[Load]] = {}
    names = list(COMMANDS)
    line = progress_line("server candidates", ROUNDS * len(names) * len(ROUTES), "windows")
    for n in range(ROUNDS):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            with serving(name, env, tmp / f"{name}.log") as url:
                if n == 0 and name == names[0]:
                    hs.create_campaign(url, CAMPAIGN)
                for route_name, route in _routes(url).items():
                    line.step(f"{name} {route_name}")
                    warm = generator.measure(route, WARMUP)
                    loads.setdefault((name, f"{route_name} (warm-up)"), []).append(warm)
                    loads.setdefault((name, route_name), []).append(
                        generator.measure(route, SECONDS)
                    )
    line.close()
    return loads, generator.name


def _held(redis_url: str) -> int:
    """The units the benchmark's reservations hold (every 201 one unit)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return int(client.hget(keys_of(CAMPAIGN).inv, f"h:{hs.HOT}") or 0)
    finally:
        client.close()


def _rows(loads: dict[tuple[str, str], list[Load]], loadgen: str) -> list[dict[str, Any]]:
    rows = []
    for name in COMMANDS:
        for route in ROUTES:
            rounds = loads[(name, route)]
            best = sorted(rounds, key=lambda load: load.rate)[len(rounds) // 2]
            base = loads[("flashteam", route)]
            ratio = median(a.rate / b.rate for a, b in zip(rounds, base, strict=True))
            rows.append(
                {
                    "server": name,
                    "route": route,
                    "requests_per_s": best.rate,
                    "p50_ms": best.p50_ms,
                    "p99_ms": best.p99_ms,
                    "vs_flashteam": ratio,
                    "rounds_per_s": "/".join(f"{load.rate:,.0f}" for load in rounds),
                    "loadgen": loadgen,
                }
            )
    return rows


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_http_server_candidates(redis_server: RedisServer, tmp_path: Path) -> None:
    loads, loadgen = _measure(redis_server.url, tmp_path)
    for (_, route), found in loads.items():
        assert all(load.socket_errors == 0 and load.requests > 0 for load in found), found
        if route.startswith("sold_out"):
            assert all(load.ok == 0 for load in found), found
        else:
            assert all(load.non_2xx == 0 for load in found), found
    reserved = [
        load.ok for (_, r), found in loads.items() if r.startswith("reserve") for load in found
    ]
    # Warm-ups included; each window can end with a reservation in flight per connection,
    # made but not answered (wrk stops reading at the end of its window).
    held = _held(redis_server.url)
    assert sum(reserved) <= held <= sum(reserved) + CONNECTIONS * len(reserved), held

    report(
        "http-servers",
        "T2 server candidates: the same API on flashteam's own server, uvicorn and granian",
        _rows(loads, loadgen),
    )
