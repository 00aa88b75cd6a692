"""`make loadtest`: the load shapes and the scenario mix, the verdict failing on states broken on
purpose, and a few-second smoke run of the whole thing (engine, Locust, drain, verdict, the
timeline charts and the progress lines)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest

from engine import Engine, Order, OrderState
from engine.keys import DEAD_LETTERS, keys_of, shard_of_order
from engine.worker import FlushWorker
from loadtests.plan import (
    SHAPES,
    Knobs,
    classify,
    format_mix,
    outcome_key,
    parse_mix,
    soak,
    spike,
    step,
)
from loadtests.timeline import CHARTS, Timeline
from loadtests.verdict import LoadTally, Verdict, judge
from testkit.factories import flash_campaign, team_campaign
from testkit.helpers import reap, sqlite_file

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- shapes and mix


def test_spike_brings_everyone_at_once_then_decays() -> None:
    knobs = Knobs(users=500, spawn_rate=250, run_time=20)
    assert spike(knobs, 0) == (500, 250)
    assert spike(knobs, 13.9) == (500, 250)
    assert spike(knobs, 14) == (50, 250)
    assert spike(knobs, 20) is None


def test_step_climbs_five_equal_steps() -> None:
    knobs = Knobs(users=100, spawn_rate=10, run_time=50)
    users = [curve[0] for t in range(50) if (curve := step(knobs, t)) is not None]
    assert sorted(set(users)) == [20, 40, 60, 80, 100]
    assert users == sorted(users)
    assert step(knobs, 50) is None


def test_soak_holds_until_the_end() -> None:
    knobs = Knobs(users=7, spawn_rate=1, run_time=3)
    assert [soak(knobs, t) for t in (0, 2.9, 3)] == [(7, 1), (7, 1), None]
    assert set(SHAPES) == {"spike", "step", "soak"}


def test_mix_parses_weights_and_rejects_nonsense() -> None:
    weights = parse_mix("flash=5, joiner=2")
    assert weights == {"flash": 5, "leader": 0, "joiner": 2, "browser": 0}
    assert parse_mix(format_mix(weights)) == weights
    for bad in ("flash", "shopper=1", "flash=-1", "flash=x", "flash=0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_bad_options_exit_2_with_the_reason() -> None:
    for options, reason in (
        (("--shards", "17"), "--shards must be between 1 and 16"),
        (("--leader-price", "1000"), "--leader-price must be between 0 and the team price"),
        (("--auto-success", "3"), "--auto-success must be 0 (off) or between 2"),
        (("--auto-success", "1"), "--auto-success must be 0 (off) or between 2"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "loadtests.run", *options],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and reason in done.stderr, (options, done.stderr)


# --------------------------------------------------------------------------- the verdict


def test_answers_are_classified() -> None:
    assert classify(201, "") == ("ok", "201")
    assert classify(409, "sold_out") == ("business", "sold_out")
    assert classify(429, "rate_limited") == ("business", "rate_limited")
    assert classify(409, "invalid_state") == ("unexpected", "409 invalid_state")
    assert classify(409, "invalid_state", frozenset({"invalid_state"}))[0] == "business"
    assert classify(503, "unavailable") == ("server_error", "503 unavailable")
    assert classify(503, "overloaded") == ("shed", "overloaded")
    assert classify(400, "validation_error")[0] == "unexpected"
    assert classify(0, "timed out") == ("transport", "timed out")


async def _sale(engine: Engine) -> tuple[str, str, str]:
    """A small flash and team sale, flushed: 3 holds (1 paid), a team with a paid leader and
    a held joiner. Returns (flash campaign, team campaign, team id)."""
    now = await engine.runtime.now()
    flash = await engine.campaigns.create(flash_campaign(now, "lt-flash", stock=10))
    team = await engine.campaigns.create(team_campaign(now, "lt-team", stock=10))
    holds = [
        await engine.flash.reserve(flash.campaign.id, f"u{i}", "sku-1", 1, f"k{i}")
        for i in range(3)
    ]
    await engine.orders.pay(holds[0].order.order_id, "u0", f"pay-0-{holds[0].order.order_id}")
    seat = await engine.teams.open(team.campaign.id, "leader", "sku-1", 1, "k")
    await engine.orders.pay(seat.order.order_id, "leader", f"pay-l-{seat.order.order_id}")
    await engine.teams.join(seat.team.team_id, "joiner", "k")
    await FlushWorker(engine.runtime).drain()
    return flash.campaign.id, team.campaign.id, seat.team.team_id


def _failed(verdict: Verdict) -> list[str]:
    return [check.name for check in verdict.checks if not check.ok]


def _tally(acknowledged: list[str], *outcomes: str) -> LoadTally:
    """What a healthy load generator saw of the sale of ``_sale``, plus ``outcomes``."""
    keys = [outcome_key("reserve", "ok", "201")] * 3 + [outcome_key("pay", "ok", "200")] * 2
    return LoadTally(Counter([*keys, *outcomes]), acknowledged)


async def _paid(engine: Engine, campaign_id: str) -> list[str]:
    orders = cast(dict[str, str], await engine.runtime.redis.hgetall(keys_of(campaign_id).orders))
    return [
        i for i, record in orders.items() if Order.from_record(i, record).state is OrderState.PAID
    ]


async def test_verdict_passes_on_a_consistent_sale(engine: Engine) -> None:
    flash, team, _ = await _sale(engine)
    paid = await _paid(engine, flash) + await _paid(engine, team)
    assert len(paid) == 2
    verdict = await judge(engine, [flash, team], _tally(paid))
    assert verdict.ok, verdict.lines()
    assert len(verdict.checks) == 8
    assert verdict.lines()[-1] == "verdict: PASS"


async def _oversell(engine: Engine, flash: str, team: str, team_id: str) -> None:
    await engine.runtime.redis.hset(keys_of(flash).inv, "a:sku-1", -1)


async def _leak(engine: Engine, flash: str, team: str, team_id: str) -> None:
    await engine.runtime.redis.hincrby(keys_of(flash).inv, "h:sku-1", -1)


async def _overfill(engine: Engine, flash: str, team: str, team_id: str) -> None:
    keys = keys_of(team)
    fields = str(await engine.runtime.redis.hget(keys.teams, team_id)).split("|")
    fields[8] = "3"  # held seats: with the paid leader, 4 seats of a 3-seat team
    await engine.runtime.redis.hset(keys.teams, team_id, "|".join(fields))


async def _sql_behind(engine: Engine, flash: str, team: str, team_id: str) -> None:
    with sqlite_file(engine.runtime.settings.sqlite_path) as db:
        db.execute(
            "UPDATE orders SET state = 'cancelled' WHERE state = 'held' AND campaign_id = ?",
            (flash,),
        )


async def _dead_letter(engine: Engine, flash: str, team: str, team_id: str) -> None:
    await engine.runtime.redis.xadd(DEAD_LETTERS, {"stream": "x", "reason": "test"})


Breakage = Callable[[Engine, str, str, str], Awaitable[None]]


@pytest.mark.parametrize(
    ("breakage", "failing"),
    [
        (_oversell, "lt-flash: no oversell"),
        (_leak, "lt-flash: no oversell"),
        # planted in Redis only: the record-by-record comparison with SQL catches it too
        (_overfill, ("lt-team: no oversell", "lt-team: SQL equals Redis")),
        (_sql_behind, "lt-flash: SQL equals Redis"),
        (_dead_letter, "no outbox event dead-lettered during the run"),
    ],
    ids=["oversold", "stock-leak", "over-filled-team", "sql-differs", "dead-letter"],
)
async def test_verdict_fails_on_a_broken_state(
    engine: Engine, breakage: Breakage, failing: str | tuple[str, ...]
) -> None:
    flash, team, team_id = await _sale(engine)
    paid = await _paid(engine, flash) + await _paid(engine, team)
    await breakage(engine, flash, team, team_id)
    verdict = await judge(engine, [flash, team], _tally(paid))
    assert not verdict.ok
    expected = (failing,) if isinstance(failing, str) else failing
    for prefix in expected:
        assert [name for name in _failed(verdict) if name.startswith(prefix)], _failed(verdict)
    assert len(_failed(verdict)) == len(expected), _failed(verdict)
    assert verdict.lines()[-1] == "verdict: FAIL"
    await engine.runtime.redis.delete(DEAD_LETTERS)


async def test_verdict_fails_on_a_lost_payment_or_a_bad_run(engine: Engine) -> None:
    flash, team, _ = await _sale(engine)
    paid = await _paid(engine, flash) + await _paid(engine, team)
    held = cast(list[str], await engine.runtime.redis.hkeys(keys_of(flash).orders))
    unpaid = next(order_id for order_id in held if order_id not in paid)
    runs = {
        "every acknowledged payment": _tally([*paid, unpaid]),  # acknowledged, still held
        "the load reached the engine": LoadTally(),  # nothing happened at all
        "no server error": _tally(paid, outcome_key("reserve", "server_error", "500")),
    }
    for failing, tally in runs.items():
        verdict = await judge(engine, [flash, team], tally)
        assert [name.split(",")[0][: len(failing)] for name in _failed(verdict)] == [failing]
    quiet_dead = await judge(engine, [flash, team], _tally(paid), dead_before=0)
    assert quiet_dead.ok
    await _dead_letter(engine, flash, team, "")
    assert (await judge(engine, [flash, team], _tally(paid), dead_before=1)).ok  # not ours
    await engine.runtime.redis.delete(DEAD_LETTERS)
    transport = await judge(
        engine, [flash, team], _tally(paid, outcome_key("pay", "transport", "x"))
    )
    assert transport.ok  # overload at the client is a finding, not a failure
    assert "transport errors" in transport.checks[-1].name


# --------------------------------------------------------------------------- smoke run


async def passing_run(tmp_path: Path, name: str, *options: str) -> str:
    """``make loadtest`` with ``options``, 40 users, a few seconds, reports and data under
    ``tmp_path``: its output, once it exited 0 with every one of its 8 checks passed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtests.run",
        *("--users", "40", "--spawn-rate", "40", "--open-after", "0.5"),
        *("--hold-seconds", "2", "--team-ttl", "3", *options),
        *("--name", name, "--reports", str(tmp_path / "reports")),
        *("--data-dir", str(tmp_path / "data")),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 100)
    finally:
        await reap(process)
    text = out.decode()
    assert process.returncode == 0, text
    assert "verdict: PASS" in text
    assert text.count("[PASS]") == 8, text
    return text


async def test_a_sharded_flash_sale_under_load(tmp_path: Path) -> None:
    """The load test with the flash campaign in 3 stock buckets (on the engine's one Redis):
    the verdict (invariants across the buckets, SQL against Redis order by order, every
    acknowledged payment) passes, and the flash orders name their buckets."""
    await passing_run(tmp_path, "sharded", "--run-time", "4", "--stock", "30", "--shards", "3")
    with sqlite_file(tmp_path / "data" / "sharded" / "flashteam.db") as db:
        (shards,) = db.execute(
            "SELECT shards FROM campaigns WHERE id = 'lt-sharded-flash'"
        ).fetchone()
        orders = [
            r[0]
            for r in db.execute(
                "SELECT order_id FROM orders WHERE campaign_id = ?", ("lt-sharded-flash",)
            )
        ]
    assert len(shards.split(",")) == 3  # the buckets' numbers
    assert len(orders) > 3 and len({shard_of_order(order) for order in orders}) > 1, orders


async def test_make_loadtest_smoke_run(tmp_path: Path) -> None:
    """A 5-second spike through the real driver: engine, Locust, drain, verdict, reports,
    the timeline's samples and charts, progress lines."""
    text = await passing_run(tmp_path, "smoke", "--run-time", "5", "--stock", "60")
    reports = tmp_path / "reports"
    assert (reports / "smoke.html").stat().st_size > 10_000
    assert (reports / "smoke-verdict.txt").read_text().strip().endswith("verdict: PASS")
    stats = json.loads((reports / "smoke.json").read_text())
    names = {entry["name"] for entry in stats}
    assert {"reserve", "pay", "open team", "quick-join", "list teams", "campaign"} <= names
    tally = LoadTally.read(reports / "smoke-tally.json")
    assert tally.count("ok", "reserve") > 0 and tally.acknowledged
    assert sum(e["num_requests"] for e in stats) == sum(tally.outcomes.values())
    assert "rejections by reason" in text and "teams: created" in text
    # The team campaign carries the deal options: its leaders paid 799, its members 999 (the
    # audit behind the first [PASS] checks every amount), and automatic success was counted.
    assert re.search(r"succeeded \d+ \(full \d+, automatically \d+ lacking \d+ seats\)", text)
    assert "worst stream lag" in text
    # What it does, as it goes (stderr is a pipe here: plain progress lines, no \r).
    for doing in ("starting the engine", "creating the campaigns", "waiting for the flush"):
        assert doing in text
    assert "judging:" in text and "drawing the timeline charts" in text
    assert "Locust: 100% 5/5 s" in text and "Locust exited with 0" in text, text
    assert "settling: 100%" in text and "\r" not in text
    # The timeline: four charts, linked from the printed summary and the verdict file.
    verdict_text = (reports / "smoke-verdict.txt").read_text()
    for kind in CHARTS:
        chart = reports / f"smoke-timeline-{kind}.png"
        data = chart.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, kind
        assert str(chart) in verdict_text and str(chart) in text
    assert str(reports / "smoke-timeline.json") in verdict_text
    timeline = Timeline.from_json((reports / "smoke-timeline.json").read_text())
    assert len(timeline.samples) >= 10  # about one a second over 5 s of load and 5 s settling
    assert {"sale opens", "load starts", "load ends", "settled"} <= set(timeline.marks)
    assert sum(rate for _, rate in timeline.requests()["ok"]) > 0
    assert timeline.latency(0.99) and timeline.gauge("flashteam_reaper_lag_seconds")
    for kind in ("flash", "team"):
        campaign_id = f"lt-smoke-{kind}"
        skus = timeline.skus(campaign_id)
        assert skus == [f"{kind}-1", f"{kind}-2"]
        assert [timeline.stock(campaign_id, sku, "available")[0][1] for sku in skus] == [60, 60]
        assert sum(timeline.stock(campaign_id, sku, "paid")[-1][1] for sku in skus) > 0
