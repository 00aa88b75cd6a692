"""T2: HTTP reserve on the stack users run, its pieces, and a naive reference, in one run.

Five systems run side by side (bench/http_stacks.py): four configurations of the engine, each
its own `flashteam run`-style stack (private redis-server, SQLite, 2 API workers, the echo
route ``POST /bench/echo`` on), and the naive reference (bench/naive.py: FastAPI, one Lua DECR
per request; uvicorn with 2 workers, uvloop, httptools, no access log; on the default stack's
Redis):

- ``stripped``: `flashteam serve` alone, rate limit off, no flush worker, no reaper;
- ``+rate_limit``: stripped plus the rate limit at its default (a new shopper per request
  never hits it, but every reservation counts its attempt);
- ``+worker_reaper``: stripped plus the flush worker and the reaper;
- ``default``: `flashteam run` with its default settings: the stack T2 is judged on (checked:
  every setting is the default but the data dir, the tokens and the echo route).

Each engine configuration is measured on four routes, closed loop, with the same generator
(bench/http_load.py: wrk, a new shopper per request):

- ``echo``: the baseline of that same server: the body decoded and sent back;
- ``reserve``: ``POST /v1/campaigns/{id}/orders`` that succeeds (10,000,000 units in stock);
- ``sold_out``: the same route on an item with no stock: every answer a 409 ``sold_out``;
- ``batch64``: ``POST /v1/batch`` with 64 reservations per request (reservations/s =
  requests/s x 64), every item answered 201;

and the naive reference on ``POST /reserve`` (every answer a 201). Then ``reserve@70%``: the
default stack's reserve paced to about 70% of its measured peak, for its p99.

To keep the run to about five minutes for 17 system-routes, windows are shorter than the
single-server run's were (6 s, 2 s warm-ups): each measurement lasts 4 s after one 1 s
warm-up per system and route, in 3 rounds (each round visits every system and route in turn,
starting one system later than the last round); each row is its median round, and each ratio
(to echo, to stripped, to the naive reference) the median over the rounds of the ratio of the
two rates of one round: figures measured within a minute of each other (an echo and a reserve
of one server, seconds apart), less moved by a noisy round than a ratio of two medians. The
paced run is calibrated by up to 3 probes of 2 s, then measured for 4 s. Where a flush worker
runs, the events its outbox still held when a window closed are reported (the most of any
round) and the next window waits until it is empty, so no system pays for another's flush.
Only ratios mean anything: the generator, the servers and Redis share the machine. Timings
are reported, never asserted; correctness is (201s, 409s, batch items, the stock adds up).
"""

from __future__ import annotations

import contextlib
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import http_stacks as hs
from bench.harness import progress_line
from bench.http_load import CONNECTIONS, Load, LoadGenerator, Route
from bench.report import RESULTS, report
from bench.results import load_results
from bench.targets import (
    BATCH_ROUTE,
    BATCH_SIZE,
    DEFAULT_STACK,
    NAIVE_SYSTEM,
    PACED_ROUTE,
    PACED_SHARE,
    STRIPPED,
    verdicts,
)
from engine.local.launcher import LocalEngine

SECONDS = 4.0  # per measurement
WARMUP = 1.0
ROUNDS = 3
PROBE_SECONDS = 2.0
PROBES = 3  # at most: the pause is calibrated until a probe is within 5% of the paced rate

Key = tuple[str, str]  # (system, route)


@dataclass(frozen=True, slots=True)
class System:
    """One server under load: its routes, and the outbox to wait for when it flushes."""

    name: str
    routes: dict[str, Route]
    redis_url: str
    campaign: str
    flushes: bool


@dataclass(frozen=True, slots=True)
class Run:
    """One measurement and the events left unflushed when it ended (flushing systems)."""

    load: Load
    unflushed: int | None


@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_http_stacks_and_naive_reference(tmp_path: Path) -> None:
    generator = LoadGenerator(tmp_path)
    with contextlib.ExitStack() as started:
        engines, systems, probed = {}, {}, {}
        for config in hs.CONFIGS:
            engine = started.enter_context(hs.stack(config, tmp_path / config.name.strip("+")))
            campaign = f"t2-{uuid.uuid4().hex[:10]}"
            hs.create_campaign(engine.url, campaign)
            probed[config.name] = hs.check_routes(engine.url, campaign)
            engines[config.name] = engine
            systems[config.name] = _engine_system(config, engine.url, engine, campaign)
        assert hs.changed_defaults(engines[DEFAULT_STACK]) == set()
        default_redis = engines[DEFAULT_STACK].settings.redis_url
        assert default_redis is not None
        naive = hs.NaiveServer(default_redis, f"naive:{uuid.uuid4().hex[:8]}", tmp_path / "n.log")
        started.enter_context(naive)
        systems[NAIVE_SYSTEM] = System(
            NAIVE_SYSTEM, {"reserve": Route(naive.url, "/reserve", hs.HOT)}, "", "", False
        )
        runs, warm, paced = _measure(generator, systems)
        assert all(hs.running(engine) for engine in engines.values())
        assert naive.process is not None and naive.process.poll() is None
        loads = {key: [*warm[key], *(run.load for run in runs[key])] for key in runs}
        for name, engine in engines.items():
            mine = {route: found for (system, route), found in loads.items() if system == name}
            _check_stock(engine.url, systems[name].campaign, probed[name], mine)
        _check_naive(naive, loads[(NAIVE_SYSTEM, "reserve")])

    rows = _rows(generator.name, runs, paced)
    report(
        "http",
        "T2 HTTP: the default `flashteam run` stack, its pieces and the stripped `flashteam "
        "serve` (each route against the echo route of the same server), and a naive FastAPI "
        "reference; 2 API workers each",
        rows,
    )
    for found in verdicts(load_results(RESULTS)):
        if found.target.id == "T2":
            print(f"{found.target.name}: {found.verdict}: {found.measured} ({found.baseline})")


def _engine_system(config: hs.Config, url: str, engine: LocalEngine, campaign: str) -> System:
    orders = f"/v1/campaigns/{campaign}/orders"
    routes = {
        "echo": Route(url, "/bench/echo", hs.HOT),
        "reserve": Route(url, orders, hs.HOT),
        "sold_out": Route(url, orders, hs.NONE),
        BATCH_ROUTE: Route(url, "/v1/batch", hs.HOT, campaign, BATCH_SIZE),
    }
    assert engine.settings.redis_url is not None
    return System(config.name, routes, engine.settings.redis_url, campaign, config.flushes)


def _measure(
    generator: LoadGenerator, systems: dict[str, System]
) -> tuple[dict[Key, list[Run]], dict[Key, list[Load]], Run]:
    """Warm-ups, the rounds, then the default stack's paced reserve."""

    windows = sum(len(system.routes) for system in systems.values()) * (1 + ROUNDS)
    line = progress_line("T2 measurement windows", windows + 1 + PROBES, "windows")

    def one(system: System, route: Route, seconds: float, pause_ms: int = 0) -> Run:
        line.step(f"{system.name} {route.path}")
        load = generator.measure(route, seconds, pause_ms)
        if not system.flushes:
            return Run(load, None)
        left = hs.unflushed(system.redis_url, system.campaign)
        hs.wait_flushed(system.redis_url, system.campaign)
        return Run(load, left)

    warm: dict[Key, list[Load]] = defaultdict(list)
    for system in systems.values():
        for route_name, target in system.routes.items():
            warm[(system.name, route_name)].append(one(system, target, WARMUP).load)
    runs: dict[Key, list[Run]] = defaultdict(list)
    names = list(systems)
    for n in range(ROUNDS):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            for route, target in systems[name].routes.items():
                runs[(name, route)].append(one(systems[name], target, SECONDS))
    # Paced: each connection pauses between requests, for ~70% of the reserve peak; the pause
    # is calibrated by short runs (a connection's cycle is pause + latency).
    default = systems[DEFAULT_STACK]
    goal = PACED_SHARE * _median(runs[(DEFAULT_STACK, "reserve")]).load.rate
    goal_ms = CONNECTIONS * 1000 / goal
    pause_ms = max(1, round(goal_ms))
    for _ in range(PROBES):
        probe = one(default, default.routes["reserve"], PROBE_SECONDS, pause_ms).load
        warm[(DEFAULT_STACK, "reserve")].append(probe)
        if abs(probe.rate - goal) <= 0.05 * goal:
            break
        cycle_ms = CONNECTIONS * 1000 / max(probe.rate, 1.0)
        pause_ms = max(1, round(pause_ms + goal_ms - cycle_ms))
    paced = one(default, default.routes["reserve"], SECONDS, pause_ms)
    warm[(DEFAULT_STACK, "reserve")].append(paced.load)
    line.close()
    return runs, warm, paced


def _check_stock(url: str, campaign: str, probed: int, loads: dict[str, list[Load]]) -> None:
    """Every load answered as its route promises, and every acknowledged reservation holds its
    unit (a few more may have committed with their answer on the wire when a run stopped)."""
    every = [load for found in loads.values() for load in found]
    assert all(load.socket_errors == 0 and load.requests > 0 for load in every), loads
    assert all(load.ok == 0 for load in loads["sold_out"]), loads["sold_out"]
    for route in ("echo", "reserve", BATCH_ROUTE):
        assert all(load.non_2xx == 0 for load in loads[route]), loads[route]
    for load in loads[BATCH_ROUTE]:  # every item of every answer reserved
        assert load.items == load.items_201 == load.ok * BATCH_SIZE, load
    reserved = probed + sum(load.ok for load in loads["reserve"])
    reserved += sum(load.items_201 for load in loads[BATCH_ROUTE])
    in_flight = CONNECTIONS * (len(loads["reserve"]) + BATCH_SIZE * len(loads[BATCH_ROUTE]))
    buckets = hs.stock(url, campaign)
    hot, none = buckets[hs.HOT], buckets[hs.NONE]
    assert (none["available"], none["held"]) == (0, 0), none
    assert hot["available"] + hot["held"] + hot["paid"] + hot["gone"] == hot["initial"], hot
    assert reserved <= hot["held"] <= reserved + in_flight, (reserved, hot)


def _check_naive(naive: hs.NaiveServer, loads: list[Load]) -> None:
    assert all(load.socket_errors == 0 and load.non_2xx == 0 for load in loads), loads
    answered = sum(load.ok for load in loads)
    taken = hs.STOCK - naive.left()
    assert answered <= taken <= answered + CONNECTIONS * len(loads), (answered, taken)


def _median(runs: list[Run]) -> Run:
    """The run of median throughput: one noisy round on a shared machine does not decide."""
    return sorted(runs, key=lambda run: run.load.rate)[len(runs) // 2]


def _paired(runs: dict[Key, list[Run]], key: Key, base: Key, route: str = "") -> float | str:
    """The median over rounds of ``key``'s rate over ``base``'s in the same round (reservations
    per second with ``route``, else requests): a ratio of two figures measured seconds apart,
    which a noisy round moves less than a ratio of two medians; "" without ``base``."""
    if base not in runs:
        return ""
    ratios = sorted(
        (_reservations(route, a.load) if route else a.load.rate) / b.load.rate
        for a, b in zip(runs[key], runs[base], strict=True)
    )
    return ratios[len(ratios) // 2]


def _rows(loadgen: str, runs: dict[Key, list[Run]], paced: Run) -> list[dict[str, Any]]:
    best = {key: _median(rounds) for key, rounds in runs.items()}
    naive = (NAIVE_SYSTEM, "reserve")
    rows = []
    for (system, route), run in best.items():
        key = (system, route)
        lefts = [r.unflushed for r in runs[key] if r.unflushed is not None]
        engine = system != NAIVE_SYSTEM
        reserves = _reservations(route, run.load) > 0
        rows.append(
            _row(system, route, loadgen, run.load, runs[key])
            | {
                "ratio_to_echo": _paired(runs, key, (system, "echo")) if engine else "",
                "vs_stripped": _paired(runs, key, (STRIPPED, route)) if engine else "",
                "vs_naive": _paired(runs, key, naive, route) if reserves else "",
                "unflushed_at_end": max(lefts) if lefts else "",
            }
        )
    share = paced.load.rate / best[(DEFAULT_STACK, "reserve")].load.rate
    rows.append(
        _row(DEFAULT_STACK, PACED_ROUTE, loadgen, paced.load, [paced], of_peak=share)
        | {"ratio_to_echo": "", "vs_stripped": "", "vs_naive": ""}
        | {"unflushed_at_end": paced.unflushed if paced.unflushed is not None else ""}
    )
    return rows


def _reservations(route: str, load: Load) -> float:
    """Reservations per second: a batch's are its items; echo and sold-out reserve none."""
    if route == BATCH_ROUTE:
        return load.rate * BATCH_SIZE
    return load.rate if route in ("reserve", PACED_ROUTE) else 0.0


def _row(
    system: str, route: str, loadgen: str, load: Load, rounds: list[Run], of_peak: float = 1.0
) -> dict[str, Any]:
    reserves = _reservations(route, load)
    return {
        "config": system,
        "route": route,
        "loadgen": loadgen,
        "requests": load.requests,
        "requests_per_s": load.rate,
        "reservations_per_s": reserves if reserves else "",
        "rounds_per_s": "/".join(f"{r.load.rate:,.0f}" for r in rounds),
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "of_peak": of_peak,
    }
