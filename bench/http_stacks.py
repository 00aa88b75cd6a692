"""The systems the T2 HTTP benchmark (bench/test_http.py) measures, and how it talks to them.

Four configurations of the engine, each a ``LocalEngine`` of its own (a private redis-server
with AOF as `flashteam run` starts it, SQLite in its own folder, 2 API workers), the echo route
on in each:

- ``stripped``: `flashteam serve` alone, rate limit off: no flush worker, no reaper;
- ``+rate_limit``: the same with the rate limit at its default (5 attempts per user per s);
- ``+worker_reaper``: rate limit off, with the flush worker and the reaper running;
- ``default``: `flashteam run` with its default settings (rate limit on, pay durability sql,
  flush worker and reaper running): what users run, the stack T2's targets are judged on.

And the naive reference (bench/naive.py) under uvicorn (2 workers, uvloop, httptools, no access
log), on the default stack's Redis with a key of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import redis

from bench.targets import DEFAULT_STACK, STRIPPED
from engine.keys import keys_of
from engine.local.launcher import EVERYTHING, LocalEngine, Service
from engine.local.launcher import TEST_ADMIN_TOKEN as ADMIN
from engine.local.launcher import TEST_GATEWAY_TOKEN as GATEWAY
from engine.local.process import Server, free_port
from engine.settings import API_WORKERS, Settings

ROOT = Path(__file__).resolve().parents[1]
# bench/naive.py's variables (not imported: that module makes its Redis client on import).
NAIVE_REDIS_URL, NAIVE_STOCK_KEY = "NAIVE_REDIS_URL", "NAIVE_STOCK_KEY"
HOT, NONE = "hot", "none"
STOCK = 10_000_000
# Loopback calls must not go through an HTTP proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Config:
    """One configuration of the engine: its processes and what it changes from the defaults."""

    name: str
    services: tuple[Service, ...]
    rate_limit: bool

    @property
    def flushes(self) -> bool:
        """Whether a flush worker drains its outbox."""
        return "flush worker" in self.services


CONFIGS = (
    Config(STRIPPED, ("api",), rate_limit=False),
    Config("+rate_limit", ("api",), rate_limit=True),
    Config("+worker_reaper", EVERYTHING, rate_limit=False),
    Config(DEFAULT_STACK, EVERYTHING, rate_limit=True),
)
# What the benchmark sets on every stack; every other setting is the default.
_SET = frozenset({"data_dir", "gateway_token", "admin_token", "echo_route", "rate_limit"})
# What LocalEngine resolves when it starts: the private Redis and the SQLite file.
_RESOLVED = frozenset({"redis_url", "database_url"})


def stack(config: Config, folder: Path) -> LocalEngine:
    """The engine of ``config`` (not started), its data and log under ``folder``."""
    settings = Settings(
        data_dir=folder, gateway_token=GATEWAY, admin_token=ADMIN, echo_route=True
    ).with_(**({} if config.rate_limit else {"rate_limit": 0}))
    return LocalEngine(
        settings,
        services=config.services,
        port=free_port(),
        workers=API_WORKERS,
        log=folder / "engine.log",
    )


def changed_defaults(engine: LocalEngine) -> set[str]:
    """The settings of a started stack that differ from the defaults, besides those the
    benchmark sets and those LocalEngine resolves (none for the default stack)."""
    defaults = Settings()
    return {
        each.name
        for each in fields(Settings)
        if each.name not in _SET | _RESOLVED
        and getattr(engine.settings, each.name) != getattr(defaults, each.name)
    }


def running(engine: LocalEngine) -> bool:
    """Whether every process of the stack is still up."""
    return bool(engine.processes) and all(p.poll() is None for p in engine.processes.values())


def call(url: str, method: str, path: str, body: Any, token: str = GATEWAY) -> tuple[int, Any]:
    """One JSON call; the status and the decoded body."""
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with _DIRECT.open(request, timeout=10) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return int(refused.code), json.loads(refused.read())


def create_campaign(url: str, campaign_id: str) -> None:
    """A flash campaign on now: ``hot`` with STOCK units, ``none`` with none."""
    now = datetime.now(UTC)
    status, body = call(
        url,
        "POST",
        "/v1/campaigns",
        {
            "id": campaign_id,
            "kind": "flash",
            "title": "T2 HTTP benchmark",
            "starts_at": (now - timedelta(seconds=1)).isoformat(),
            "ends_at": (now + timedelta(hours=2)).isoformat(),
            "items": [
                {"sku": HOT, "price": 100, "stock": STOCK},
                {"sku": NONE, "price": 100, "stock": 0},
            ],
            "per_user_limit": 1_000_000,
            "hold_seconds": 86_400,
        },
        ADMIN,
    )
    assert status == 201, body


def stock(url: str, campaign_id: str) -> dict[str, dict[str, Any]]:
    """The campaign's stock buckets, by sku."""
    status, body = call(url, "GET", f"/v1/campaigns/{campaign_id}", None)
    assert status == 200, body
    return {item["sku"]: item for item in body["stock"]}


def check_routes(url: str, campaign_id: str) -> int:
    """One request per route before the load: each answers what its rows claim. Returns the
    units these probes reserved."""
    sample = {"user_id": "probe", "sku": HOT, "qty": 1, "idempotency_key": "k"}
    assert call(url, "POST", "/bench/echo", sample) == (200, sample)
    orders = f"/v1/campaigns/{campaign_id}/orders"
    status, order = call(url, "POST", orders, sample)
    assert status == 201 and order["state"] == "held", order
    status, refused = call(url, "POST", orders, sample | {"user_id": "probe-2", "sku": NONE})
    assert (status, refused["error"]["code"]) == (409, "sold_out"), refused
    item = {"op": "reserve", "campaign_id": campaign_id, "sku": HOT, "qty": 1}
    item |= {"idempotency_key": "k"}
    items = [item | {"user_id": f"probe-batch-{n}"} for n in range(2)]
    status, answer = call(url, "POST", "/v1/batch", {"requests": items})
    assert status == 200 and [r["status"] for r in answer["results"]] == [201, 201], answer
    return 1 + len(items)


def unflushed(redis_url: str, campaign_id: str) -> int:
    """Events of the campaign's outbox the flush worker has not taken yet."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xlen(keys_of(campaign_id).events))
    finally:
        client.close()


def wait_flushed(redis_url: str, campaign_id: str, timeout: float = 120.0) -> float:
    """Wait until the flush worker emptied the outbox; the seconds it took."""
    started = time.monotonic()
    while unflushed(redis_url, campaign_id):
        assert time.monotonic() - started < timeout, "the flush worker did not drain the outbox"
        time.sleep(0.1)
    return time.monotonic() - started


class NaiveServer(Server):
    """bench/naive.py under uvicorn (2 workers, uvloop, httptools, no access log) on a free
    port, its Redis key set to STOCK units on start; its output goes to ``log``."""

    def __init__(self, redis_url: str, key: str, log: Path) -> None:
        self.redis_url, self.key, self.log = redis_url, key, log
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def left(self) -> int:
        """The units its key still holds."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.get(self.key) or 0)
        finally:
            client.close()

    def start(self) -> Self:
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.set(self.key, STOCK)
        finally:
            client.close()
        command = [sys.executable, "-m", "uvicorn", "bench.naive:app", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", str(API_WORKERS), "--loop", "uvloop"]
        command += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        env = os.environ | {NAIVE_REDIS_URL: self.redis_url, NAIVE_STOCK_KEY: self.key}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(OSError), _DIRECT.open(f"{self.url}/openapi.json", timeout=1):
                return self
            assert time.monotonic() < deadline, "the naive reference did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
