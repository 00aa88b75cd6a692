"""Micro benchmarks of the Lua scripts on the real redis-server (pytest-benchmark).

Each script is called the way the engine calls it (same KEYS and ARGV), one call at a time
from a synchronous redis-py client with hiredis, so a round is one loopback round trip plus
the script's run in Redis. Next to pytest-benchmark's round-trip timings, ``redis_us`` is the
time Redis itself spent per call (``INFO commandstats``, EVALSHA only: the rounds' setup runs
through EVAL, so it is not counted), and ``redis_us_per_request`` the same per reservation
for the batch: what bounds the throughput of one Redis core.

Scripts: reserve_stock, pay_order and cancel_order (each on a fresh held order made by the
round's setup), join_team (a given open team), quick_join (seated in an open team),
list_teams (20 of 200 open teams), and batch.lua with 64 reservations.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.harness import fresh_engine, run
from bench.report import report
from engine import Engine, Settings
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import Reservation, TeamSeatResult
from engine.scripts import (
    JOIN,
    QUICK,
    RESERVE,
    Call,
    OrderArgs,
    decode,
    is_ok,
    script_source,
)
from testkit.factories import flash_campaign, team_campaign

ROUNDS = 2_000
BATCH_ROUNDS = 300
BATCH = 64
TEAM_SIZE = 5
LISTED_TEAMS = 200
FLASH, TEAM = "mflash", "mteam"
ARGS = OrderArgs.of(Settings(rate_limit=0))

SCRIPTS = (
    "reserve_stock",
    "pay_order",
    "cancel_order",
    "join_team",
    "quick_join",
    "list_teams",
    "batch64",
)


@dataclass
class Scene:
    """The sync client, the scripts' SHAs and the open teams the scripts work on."""

    url: str
    client: redis.Redis
    sha: dict[str, str]
    source: dict[str, str]
    join_teams: list[str]
    users: Iterator[int]
    rows: list[dict[str, Any]]

    def evalsha(self, script: str, keys: list[str], args: list[Any]) -> list[Any]:
        reply: list[Any] = self.client.evalsha(self.sha[script], len(keys), *keys, *args)
        return reply

    def eval(self, script: str, keys: list[str], args: list[Any]) -> list[Any]:
        """The same call through EVAL: a setup step that INFO's evalsha stats do not count."""
        reply: list[Any] = self.client.eval(self.source[script], len(keys), *keys, *args)
        return reply


def _order_call(campaign: str, user: str) -> tuple[list[str], list[Any]]:
    keys = keys_of(campaign)
    call = Call(RESERVE, user, "sku-1", "", 1, "k")
    return list(keys.order_keys), list(ARGS.one(campaign, call))


async def _open_teams(engine: Engine, sku: str, teams: int) -> list[str]:
    """Open teams of TEAM_SIZE, their leaders paid (TEAM_SIZE - 1 free seats each)."""
    ids = []
    for n in range(teams):
        seat = await engine.teams.open(TEAM, f"lead-{sku}-{n}", sku, 1, "k")
        await engine.orders.pay(seat.order.order_id, f"lead-{sku}-{n}", "p")
        ids.append(seat.team.team_id)
    return ids


async def _prepare(url: str, tmp: Path) -> list[str]:
    async with fresh_engine(url, tmp, "scripts") as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, FLASH, stock=50_000_000, limit=1))
        skus = ("sku-1", "sku-2", "sku-3")
        await engine.campaigns.create(
            team_campaign(now, TEAM, stock=50_000_000, limit=1, team_size=TEAM_SIZE, skus=skus)
        )
        seats = TEAM_SIZE - 1
        joinable = await _open_teams(engine, "sku-1", ROUNDS // seats + 1)
        await _open_teams(engine, "sku-2", ROUNDS // seats + 1)
        await _open_teams(engine, "sku-3", LISTED_TEAMS)
        return joinable


@pytest.fixture(scope="module")
def scene(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    joinable = run(_prepare(redis_server.url, tmp_path_factory.mktemp("scripts")))
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    names = ("reserve_stock", "pay_order", "cancel_order", "join_team", "quick_join")
    source = {name: script_source(name) for name in (*names, "list_teams", "batch")}
    sha = {name: str(client.script_load(text)) for name, text in source.items()}
    rows: list[dict[str, Any]] = []
    yield Scene(redis_server.url, client, sha, source, joinable, itertools.count(), rows)
    client.close()
    if rows:
        report("scripts", "Lua scripts, one call at a time (pytest-benchmark)", rows)


def _held_order(scene: Scene) -> tuple[tuple[str, str], dict[str, Any]]:
    """A setup step: a fresh held order; returns pytest-benchmark's (args, kwargs)."""
    user = f"s{next(scene.users)}"
    keys, args = _order_call(FLASH, user)
    call = Call(RESERVE, user, "sku-1", "", 1, "k")
    held = decode(call, scene.eval("reserve_stock", keys, args), FLASH)
    assert isinstance(held, Reservation), held
    return (held.order.order_id, user), {}


def _calls(scene: Scene, script: str) -> tuple[Callable[..., Any], Any, int, int]:
    """(target, setup, rounds, requests per call) of one script's benchmark."""
    flash, team = keys_of(FLASH), keys_of(TEAM)

    def reserve() -> None:
        keys, args = _order_call(FLASH, f"r{next(scene.users)}")
        assert is_ok(scene.evalsha("reserve_stock", keys, args))

    def pay(order_id: str, user: str) -> None:
        reply = scene.evalsha("pay_order", list(flash.order_keys), [order_id, user, "p"])
        assert is_ok(reply), reply

    def cancel(order_id: str, user: str) -> None:
        reply = scene.evalsha("cancel_order", list(flash.order_keys), [order_id, user])
        assert is_ok(reply), reply

    joins = itertools.count()

    def join() -> None:
        n = next(joins)
        user = f"j{n}"
        keys = list(team.order_keys)
        team_id = scene.join_teams[n // (TEAM_SIZE - 1)]
        call = Call(JOIN, user, "", team_id, 0, "k")
        reply = scene.evalsha("join_team", keys, list(ARGS.one(TEAM, call)))
        assert is_ok(reply), reply

    def quick() -> None:
        user = f"q{next(scene.users)}"
        keys = list(team.order_keys)
        call = Call(QUICK, user, "sku-2", "", 0, "k")
        reply = scene.evalsha("quick_join", keys, list(ARGS.one(TEAM, call)))
        seat = decode(call, reply, TEAM)
        assert isinstance(seat, TeamSeatResult) and not seat.opened, reply  # an open team

    def listing() -> None:
        reply = scene.evalsha("list_teams", list(team.order_keys), ["sku-3", "viewer", 20])
        assert len(reply) == 41, len(reply)

    def batch() -> None:
        keys: list[str] = list(flash.order_keys)  # no rate-limit keys: the limit is off
        calls = [Call(RESERVE, f"b{next(scene.users)}", "sku-1", "", 1, "k") for _ in range(BATCH)]
        replies = scene.evalsha("batch", keys, list(ARGS.batch(FLASH, calls)))
        assert all(is_ok(reply) for reply in replies)

    def held() -> tuple[tuple[str, str], dict[str, Any]]:
        return _held_order(scene)

    table: dict[str, tuple[Callable[..., Any], Any, int, int]] = {
        "reserve_stock": (reserve, None, ROUNDS, 1),
        "pay_order": (pay, held, ROUNDS, 1),
        "cancel_order": (cancel, held, ROUNDS, 1),
        "join_team": (join, None, ROUNDS, 1),
        "quick_join": (quick, None, ROUNDS, 1),
        "list_teams": (listing, None, ROUNDS, 1),
        "batch64": (batch, None, BATCH_ROUNDS, BATCH),
    }
    return table[script]


@pytest.mark.benchmark
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", SCRIPTS)
def test_script(scene: Scene, benchmark: Any, script: str) -> None:
    target, setup, rounds, requests = _calls(scene, script)
    scene.client.config_resetstat()
    benchmark.group = "lua scripts"
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    server = scene.client.info("commandstats")["cmdstat_evalsha"]
    assert int(server["calls"]) == rounds  # only the measured calls, no NOSCRIPT retries
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    redis_us = float(server["usec_per_call"])
    scene.rows.append(
        {
            "script": script,
            "rounds": rounds,
            "requests_per_call": requests,
            "median_us": stats.median * 1e6,
            "mean_us": stats.mean * 1e6,
            "calls_per_s": 1 / stats.mean,
            "requests_per_s": requests / stats.mean,
            "redis_us": redis_us,
            "redis_us_per_request": redis_us / requests,
        }
    )
