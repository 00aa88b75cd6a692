"""`make loadtest` (``python -m loadtests.run``): the opening of a sale, end to end, with a verdict.

1. Starts the whole engine locally with ``flashteam run``'s launcher (engine.local.launcher: a
   private redis-server, SQLite, the API, the flush worker and the reaper) under
   ``var/loadtest/<name>/``, or targets a running one with ``--host`` (then ``--redis-url`` and
   ``--database-url`` let it check).
2. Creates a flash campaign (in ``--shards`` stock buckets) and a team campaign that open
   ``--open-after`` seconds later, one unit per order; the team campaign with the team deal options
   (docs/lifecycle.md#team-deal-options): a leader price (``--leader-price``) and automatic
   success (``--auto-success``).
3. Runs Locust headless (``loadtests/locustfile.py``) with the chosen shape for ``--run-time``
   seconds, writing ``<name>.html``, ``<name>.json`` and Locust's CSV files under
   ``--reports``, with a progress line (requests so far, the current rate); from then until
   the sale has settled it samples the engine every second: /metrics (stream lag, reaper lag,
   the request histogram) and each campaign's stock (loadtests/timeline.py).
4. Lets the sale settle (every hold and team of the run reaches its end), waits for the flush
   worker to drain the outbox, stops the local engine, and checks the invariants of
   docs/invariants.md (no oversell, no stock leak, per-user limits, no over-filled team, SQL
   equal to Redis, nothing dead-lettered), that every acknowledged payment is a paid order in
   SQL, and that the run was healthy (it reached the engine; no 5xx, no unexpected answer).
5. Keeps the samples as ``<name>-timeline.json`` and draws them (``<name>-timeline-*.png``:
   requests/s by outcome, latency p50/p99, stock per item, stream and reaper lag; skipped
   without matplotlib), prints the campaign KPIs (docs/kpis.md), the charts' paths and the
   verdict (also saved as ``<name>-verdict.txt``); exits 1 if any check fails, 2 on bad
   options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop

from bench.progress import Progress
from engine.core import Engine
from engine.keys import ID_PATTERN
from engine.local.launcher import LocalEngine
from engine.local.process import free_port
from engine.local.redis_server import RedisServer
from engine.models import MAX_SHARDS
from engine.settings import API_WORKERS, DEFAULTS, Settings
from engine.worker import FlushWorker
from loadtests.plan import DEFAULT_MIX, SHAPES, parse_mix
from loadtests.timeline import CHARTS, Stock, Timeline, draw, peaks, stock_of
from loadtests.verdict import (
    LoadTally,
    Verdict,
    campaign_kpis,
    dead_letters,
    judge,
    read_locust_json,
    request_table,
)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
TEAM_PRICE = 999  # the team campaign's unit price; the flash campaign's is 1999
STOP_TIMEOUT = 5  # seconds Locust gives a user to finish its task when the load ends
#: What a run writes next to ``<reports>/<name>``.
OUTPUTS = (
    *(".html", ".json", "-tally.json", "-verdict.txt", "-timeline.json"),
    *(f"_{kind}.csv" for kind in ("stats", "stats_history", "failures", "exceptions")),
    *(f"-timeline-{kind}.png" for kind in CHARTS),
)


@dataclass(slots=True)
class Target:
    """The engine under load: its URL, tokens, and where its state lives (for the verdict)."""

    host: str
    gateway_token: str
    admin_token: str
    redis_url: str
    database_url: str
    local: LocalEngine | None = None  # the engine started for the run, if ours

    def stop(self) -> None:
        """Stop a local engine's processes (see LocalEngine.stop); its Redis stays up for the
        verdict."""
        if self.local is not None:
            self.local.stop()

    def settings(self) -> Settings:
        """The engine's settings as this process's environment gives them, with its stores."""
        return Settings.from_env(
            {
                **os.environ,
                "FLASHTEAM_REDIS_URL": self.redis_url,
                "FLASHTEAM_DATABASE_URL": self.database_url,
            }
        )


@dataclass(slots=True)
class Gauges:
    """The engine's /metrics sampled every second during the run: worst lags seen, and the
    script latency totals of the last sample."""

    stream_lag_s: float = 0.0
    reaper_lag_s: float = 0.0
    samples: int = 0
    scripts: dict[str, tuple[float, float]] = field(default_factory=dict)  # (seconds, calls)

    def add(self, text: str) -> None:
        for name, value in re.findall(r"^(flashteam_\w+_lag_seconds) (\S+)$", text, re.M):
            if name == "flashteam_stream_lag_seconds":
                self.stream_lag_s = max(self.stream_lag_s, float(value))
            elif name == "flashteam_reaper_lag_seconds":
                self.reaper_lag_s = max(self.reaper_lag_s, float(value))
        totals: dict[str, list[float]] = {}
        pattern = r'^flashteam_script_seconds_(sum|count)\{script="([^"]+)"\} (\S+)$'
        for kind, script, value in re.findall(pattern, text, re.M):
            totals.setdefault(script, [0.0, 0.0])[kind == "count"] += float(value)
        self.scripts = {script: (s, n) for script, (s, n) in totals.items() if n}
        self.samples += 1

    def lines(self) -> list[str]:
        if not self.samples:
            return ["  /metrics could not be read"]
        out = [
            f"  worst stream lag (oldest unflushed event) {self.stream_lag_s:.2f} s, worst "
            f"reaper lag {self.reaper_lag_s:.2f} s ({self.samples} samples of /metrics)"
        ]
        for script, (seconds, calls) in sorted(self.scripts.items()):
            out.append(
                f"  script {script:<16} {calls:>10,.0f} calls, mean {seconds / calls * 1000:.2f} ms"
            )
        return out


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None of options that have none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="Reproduce the opening of a flash sale and a team sale with Locust, then "
        "check the invariants (docs/invariants.md) and print the KPIs (docs/kpis.md). Without "
        "--host it starts the whole engine locally (private redis-server, SQLite) and stops it "
        "after.",
        formatter_class=_Help,
    )
    target = p.add_argument_group(
        "target (default: a local engine started for the run; with --host, the tokens come "
        "from FLASHTEAM_GATEWAY_TOKEN and FLASHTEAM_ADMIN_TOKEN)"
    )
    target.add_argument("--host", help="URL of a running engine, e.g. http://10.0.0.5:8000")
    target.add_argument("--redis-url", help="its Redis (FLASHTEAM_REDIS_URL); needs --host")
    target.add_argument("--database-url", help="its SQL store (FLASHTEAM_DATABASE_URL)")
    target.add_argument("--api-workers", type=int, default=API_WORKERS, help="local API processes")
    load = p.add_argument_group("load")
    load.add_argument("--shape", choices=sorted(SHAPES), default="spike", help="load shape")
    load.add_argument("-u", "--users", type=int, default=300, help="peak concurrent users")
    load.add_argument("-r", "--spawn-rate", type=float, default=100.0, help="users started/s")
    load.add_argument("-t", "--run-time", type=int, default=30, help="seconds of load")
    load.add_argument("--mix", default=DEFAULT_MIX, help="scenario weights")
    load.add_argument("--pay-rate", type=float, default=0.6, help="share of holds paid")
    load.add_argument("--cancel-rate", type=float, default=0.2, help="share of holds cancelled")
    load.add_argument(
        "--processes", type=int, default=1, help="Locust processes here (-1: one per core)"
    )
    load.add_argument(
        "--expect-workers",
        type=int,
        default=0,
        help="run Locust as a distributed master (needs --host) and wait up to 5 minutes for "
        "this many workers: `locust -f loadtests/locustfile.py --worker --master-host <here>`",
    )
    sale = p.add_argument_group("the sale")
    sale.add_argument("--items", type=int, default=2, help="items per campaign")
    sale.add_argument("--stock", type=int, default=1000, help="units per item")
    sale.add_argument(
        "--shards",
        type=int,
        default=1,
        help=f"stock buckets of the flash campaign (1 to {MAX_SHARDS}; more than 1: one hot "
        "item on several Redis masters, docs/architecture.md#sharded-flash-campaigns)",
    )
    sale.add_argument("--team-size", type=int, default=3, help="seats per team")
    sale.add_argument("--hold-seconds", type=int, default=10, help="payment window of a hold")
    sale.add_argument("--team-ttl", type=int, default=20, help="seconds a team stays open")
    sale.add_argument(
        "--leader-price",
        type=int,
        default=TEAM_PRICE - 200,
        help=f"what a team's leader pays per unit (team deal option; the team price is "
        f"{TEAM_PRICE}; default %(default)s)",
    )
    sale.add_argument(
        "--auto-success",
        type=int,
        default=2,
        help="a team whose time runs out with this many paid seats succeeds (team deal "
        "option; 0: off; else 2 to team size - 1; default %(default)s)",
    )
    sale.add_argument(
        "--open-after", type=float, default=2.0, help="seconds from creation to the opening"
    )
    sale.add_argument(
        "--settle",
        type=float,
        help="seconds to wait after the load for holds and teams to end (default: hold "
        "seconds + team TTL + 2)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--reports",
        type=Path,
        default=ROOT / "loadtests" / "reports",
        help="folder for the Locust reports and the verdict",
    )
    out.add_argument("--name", help="report name; default <shape>-<UTC time>")
    out.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / DEFAULTS.data_dir / "loadtest",
        help="where a local engine keeps its Redis, SQLite and log (in <name>/)",
    )
    out.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to wait for the flush"
    )
    return p


def _problem(args: argparse.Namespace) -> str | None:
    """A usage problem with the options, or None."""
    try:
        parse_mix(args.mix)
    except ValueError as exc:
        return str(exc)
    if args.name is not None and not re.fullmatch(ID_PATTERN, f"lt-{args.name}-flash"):
        return "--name: letters, digits, '-' and '_' only, at most 55 characters"
    return _target_problem(args) or _number_problem(args)


def _target_problem(args: argparse.Namespace) -> str | None:
    if args.host:
        if not (args.redis_url and args.database_url):
            return "--host needs --redis-url and --database-url: the verdict reads both stores"
        tokens = ("FLASHTEAM_GATEWAY_TOKEN", "FLASHTEAM_ADMIN_TOKEN")
        if not all(os.environ.get(token) for token in tokens):
            return "--host needs FLASHTEAM_GATEWAY_TOKEN and FLASHTEAM_ADMIN_TOKEN set"
    elif args.redis_url or args.database_url:
        return "--redis-url and --database-url go with --host"
    if args.expect_workers and not args.host:
        return "--expect-workers needs --host: remote workers cannot reach a local engine"
    if args.expect_workers and args.processes != 1:
        return "--expect-workers and --processes do not mix: workers bring their own processes"
    return None


def _number_problem(args: argparse.Namespace) -> str | None:
    counts = ("users", "run_time", "items", "stock", "hold_seconds", "team_ttl", "api_workers")
    for name in counts:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be 1 or more"
    if args.processes == 0 or args.processes < -1 or args.expect_workers < 0:
        return "--processes must be -1 or 1 or more; --expect-workers 0 or more"
    if args.spawn_rate <= 0 or args.drain_timeout <= 0:
        return "--spawn-rate and --drain-timeout must be positive"
    if min(args.pay_rate, args.cancel_rate, args.open_after, args.settle or 0) < 0:
        return "--pay-rate, --cancel-rate, --open-after and --settle cannot be negative"
    if args.pay_rate + args.cancel_rate > 1:
        return "--pay-rate + --cancel-rate must be at most 1"
    return _sale_problem(args)


def _sale_problem(args: argparse.Namespace) -> str | None:
    """A problem with the campaigns' options (team size, shards, team deal options)."""
    if not 2 <= args.team_size <= 100:
        return "--team-size must be between 2 and 100"
    if not 1 <= args.shards <= MAX_SHARDS:
        return f"--shards must be between 1 and {MAX_SHARDS}"
    if not 0 <= args.leader_price <= TEAM_PRICE:
        return f"--leader-price must be between 0 and the team price, {TEAM_PRICE}"
    if args.auto_success and not 2 <= args.auto_success < args.team_size:
        return "--auto-success must be 0 (off) or between 2 and --team-size - 1"
    return None


@contextlib.contextmanager
def local_engine(data_dir: Path, workers: int, log: Path) -> Iterator[Target]:
    """The engine as `flashteam run` starts it, on a free port, with default settings, its
    own redis-server and SQLite under data_dir (emptied first: a run's name owns its data
    dir); the redis-server outlives the processes, for the verdict."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    with RedisServer(data_dir / "redis") as redis:
        settings = Settings(redis_url=redis.url, data_dir=data_dir)
        with LocalEngine(settings, port=free_port(), workers=workers, log=log) as local:
            gateway, admin = local.settings.require_tokens()
            database_url = f"sqlite:///{local.settings.sqlite_path}"
            yield Target(local.url, gateway[0], admin[0], redis.url, database_url, local)


def _http(target: Target, method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target.host + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            raw = reply.read()
            return reply.status, json.loads(raw) if "json" in reply.headers["content-type"] else raw
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def create_campaigns(target: Target, args: argparse.Namespace, name: str) -> list[str]:
    """A flash and a team campaign opening ``--open-after`` seconds from now."""
    opens = datetime.now(UTC) + timedelta(seconds=args.open_after)
    team = {
        "team_size": args.team_size,
        "team_ttl_seconds": args.team_ttl,
        "auto_success_min_paid": args.auto_success or None,
    }
    ids = []
    flash = {"shards": args.shards}
    for kind, price, limit, extra in (("flash", 1999, 2, flash), ("team", TEAM_PRICE, 1, team)):
        leader = {"leader_price": args.leader_price} if kind == "team" else {}
        campaign = {
            "id": f"lt-{name}-{kind}",
            "kind": kind,
            "title": f"load test {name}: {kind} sale",
            "starts_at": opens.isoformat(),
            "ends_at": (opens + timedelta(days=1)).isoformat(),
            "items": [
                {"sku": f"{kind}-{i}", "price": price, "stock": args.stock, **leader}
                for i in range(1, args.items + 1)
            ],
            "per_user_limit": limit,
            "per_order_limit": 1,  # every shopper takes one unit per order
            "hold_seconds": args.hold_seconds,
            **extra,
        }
        status, reply = _http(target, "POST", "/v1/campaigns", campaign, target.admin_token)
        if status != 201:
            raise RuntimeError(f"creating campaign {campaign['id']}: HTTP {status} {reply}")
        ids.append(str(campaign["id"]))
    return ids


def read_stock(target: Target, campaigns: list[str]) -> Stock:
    """Each campaign's stock per item (``GET /v1/campaigns/{id}``, admin token); a campaign
    that did not answer is left out."""
    stock: Stock = {}
    for campaign_id in campaigns:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            status, body = _http(
                target, "GET", f"/v1/campaigns/{campaign_id}", None, target.admin_token
            )
            if status == 200:
                stock[campaign_id] = stock_of(body)
    return stock


@contextlib.contextmanager
def sampling(target: Target, gauges: Gauges, timeline: Timeline | None = None) -> Iterator[None]:
    """Read the engine's /metrics into ``gauges`` once a second while the block runs; with
    ``timeline``, also keep each reading there with the stock of its campaigns."""
    stop = threading.Event()

    def sample() -> None:
        due = time.monotonic()
        while True:
            text = None
            received = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                status, body = _http(target, "GET", "/metrics", None, "")
                received = time.monotonic()
                if status == 200:
                    text = body.decode()
                    gauges.add(text)
            # the engine renders /metrics once the request is through its queue: at the end
            at = received
            if timeline is not None:
                timeline.add(text, read_stock(target, timeline.campaigns), at)
            due += 1.0
            if stop.wait(max(0.0, due - time.monotonic())):
                return

    thread = threading.Thread(target=sample, name="metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_locust(
    target: Target,
    args: argparse.Namespace,
    prefix: Path,
    campaigns: list[str],
    timeline: Timeline | None = None,
) -> int:
    """Locust headless with the chosen shape; its reports under ``prefix``. A progress line
    counts the seconds of load (from the first request ``timeline`` sees) against
    ``--run-time``, with the requests so far and the current rate."""
    env = {
        **os.environ,
        "FLASHTEAM_LOAD_SHAPE": args.shape,
        "FLASHTEAM_GATEWAY_TOKEN": target.gateway_token,
    }
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "--only-summary",
        "--host", target.host,
        "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate),
        "--run-time", f"{args.run_time}s",
        "--stop-timeout", str(STOP_TIMEOUT),
        "--csv", str(prefix),
        "--html", f"{prefix}.html",
        "--json-file", str(prefix),
        "--loglevel", "WARNING",
        "--flash-campaign", campaigns[0],
        "--team-campaign", campaigns[1],
        "--mix", args.mix,
        "--pay-rate", str(args.pay_rate),
        "--cancel-rate", str(args.cancel_rate),
        "--tally-file", f"{prefix}-tally.json",
    ]  # fmt: skip
    if args.expect_workers:
        command += ["--master", "--expect-workers", str(args.expect_workers)]
        command += ["--expect-workers-max-wait", "300"]
    elif args.processes != 1:
        command += ["--processes", str(args.processes)]
    seen = timeline or Timeline("", [])
    launched = time.monotonic()
    started = None if args.expect_workers else launched  # else: from the workers' first request
    with (
        subprocess.Popen(command, env=env, cwd=ROOT) as process,
        Progress("Locust", args.run_time, unit="s", clock=True) as bar,
    ):
        while (code := _exited(process, 1.0)) is None:
            if started is None and seen.requests_seen > 0:
                started = time.monotonic()
            elapsed = 0.0 if started is None else time.monotonic() - started
            bar.update(min(elapsed, args.run_time) // 1, _load_note(seen, elapsed, args))
        elapsed = time.monotonic() - (started or launched)
        bar.update(min(elapsed, args.run_time) // 1)
        bar.close(
            f"Locust exited with {code} after {elapsed:.0f} s; {seen.requests_seen:,.0f} requests"
        )
    return code


def _exited(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _load_note(timeline: Timeline, elapsed: float, args: argparse.Namespace) -> str:
    """What the progress line says of the load: requests so far and the current rate."""
    if not timeline.requests_seen:
        return "waiting for the workers" if args.expect_workers else "starting the users"
    note = f"{timeline.requests_seen:,.0f} requests, {timeline.rate_now:,.0f}/s now"
    if elapsed > args.run_time:
        note += f"; stopping (users finish their tasks, up to {STOP_TIMEOUT} s)"
    return note


def wait(label: str, seconds: float, note: str) -> None:
    """Wait ``seconds`` with a progress line."""
    end = time.monotonic() + seconds
    with Progress(label, seconds, unit="s", clock=True) as bar:
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            bar.update(round(seconds - max(0.0, end - time.monotonic())), note)


async def _open(target: Target) -> Engine:
    try:
        return await Engine.open(target.settings())
    except Exception as exc:
        raise RuntimeError(f"cannot open the engine's stores: {exc}") from exc


async def _dead_letters_now(target: Target) -> int:
    async with await _open(target) as engine:
        return await dead_letters(engine)


async def settle_and_judge(
    target: Target, args: argparse.Namespace, campaigns: list[str], tally: LoadTally, dead: int
) -> tuple[Verdict, list[str]]:
    """Wait for the outbox to drain, stop a local engine, then judge; returns the verdict and
    the report lines."""
    print(f"waiting for the flush worker to drain the outbox (up to {args.drain_timeout:g} s)")
    async with await _open(target) as engine:
        drained = await FlushWorker(engine.runtime).wait_flushed(args.drain_timeout)
    lines = [
        f"outbox drained {drained:.1f} s after the sale settled"
        if drained is not None
        else f"outbox NOT drained within {args.drain_timeout:.0f} s of the sale settling"
    ]
    local = target.local is not None
    if local:
        print("stopping the engine", flush=True)
    target.stop()  # a local engine: no reaper racing the checks
    print(
        "judging: invariants per campaign, SQL against Redis, every acknowledged payment; "
        "then the KPIs",
        flush=True,
    )
    async with await _open(target) as engine:
        if local:
            await FlushWorker(engine.runtime).drain()  # what the reaper left at its stop
        verdict = await judge(engine, campaigns, tally, dead)
        lines += ["", "KPIs (docs/kpis.md)"]
        for campaign_id in campaigns:
            lines += await campaign_kpis(engine, campaign_id)
    return verdict, lines


def timeline_report(timeline: Timeline, prefix: Path, shown: Path) -> list[str]:
    """Write ``<name>-timeline.json`` and the charts; the summary's lines naming them."""
    Path(f"{prefix}-timeline.json").write_text(timeline.to_json())
    print("drawing the timeline charts ...", flush=True)
    charts = draw(timeline, prefix)
    lines = [
        f"timeline (each second: /metrics and the campaigns' stock, {len(timeline.samples)} "
        "samples; seconds since the sale opened)",
        *peaks(timeline),
    ]
    if charts is None:
        lines.append("  charts skipped: matplotlib is not installed (`pip install matplotlib`)")
    else:
        lines += [f"  {CHARTS[kind]:<40} {shown}-timeline-{kind}.png" for kind in charts]
    lines.append(f"  {'raw samples':<40} {shown}-timeline.json")
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except RuntimeError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    problem = _problem(args)
    if problem:
        parser.error(problem)  # exits 2
    name = args.name or f"{args.shape}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    args.reports.mkdir(parents=True, exist_ok=True)
    prefix = args.reports.resolve() / name
    for suffix in OUTPUTS:
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)  # a rerun must not read old results
    settle = args.settle if args.settle is not None else args.hold_seconds + args.team_ttl + 2
    with contextlib.ExitStack() as stack:
        if args.host:
            target = Target(
                args.host.rstrip("/"),
                os.environ["FLASHTEAM_GATEWAY_TOKEN"],
                os.environ["FLASHTEAM_ADMIN_TOKEN"],
                args.redis_url,
                args.database_url,
            )
        else:
            data_dir = args.data_dir / name
            print(f"starting the engine under {data_dir} ...", flush=True)
            target = stack.enter_context(
                local_engine(data_dir, args.api_workers, data_dir / "engine.log")
            )
        dead = uvloop.run(_dead_letters_now(target))  # also proves both stores answer
        print("creating the campaigns ...", flush=True)
        created = time.monotonic()
        campaigns = create_campaigns(target, args, name)
        timeline = Timeline(name, campaigns, origin=created + args.open_after)
        timeline.marks["sale opens"] = 0.0
        headline = (
            f"{name}: {args.shape} load on {target.host}, {args.users} users at "
            f"{args.spawn_rate:g}/s for {args.run_time} s, mix {args.mix}; campaigns "
            f"{', '.join(campaigns)} ({args.items} items x {args.stock} units) open "
            f"{args.open_after:g} s in"
        )
        print(headline, flush=True)
        gauges = Gauges()
        with sampling(target, gauges, timeline):
            timeline.mark("load starts")
            locust_code = run_locust(target, args, prefix, campaigns, timeline)
            timeline.mark("load ends")
            if not Path(f"{prefix}.json").exists():
                raise RuntimeError(f"Locust exited with {locust_code} without its results")
            print(f"load done; {settle:g} s for the holds and teams of the sale to end", flush=True)
            wait("settling", settle, "holds expiring, teams closing")
            timeline.mark("settled")
        tally = LoadTally.read(Path(f"{prefix}-tally.json"))
        verdict, lines = uvloop.run(settle_and_judge(target, args, campaigns, tally, dead))
    shown = prefix.relative_to(ROOT) if prefix.is_relative_to(ROOT) else prefix
    lines += ["", "engine (/metrics)", *gauges.lines()]
    lines += ["", f"requests over {args.run_time} s of load (latency in ms)"]
    lines += request_table(read_locust_json(Path(f"{prefix}.json")), args.run_time)
    lines += ["", "answers by request", *tally.lines()]
    lines.append(f"  reports: {shown}.html, {shown}.json (Locust exit code {locust_code})")
    lines += ["", *timeline_report(timeline, prefix, shown)]
    lines += ["", "invariants (docs/invariants.md) and the run", *verdict.lines()]
    text = "\n".join([headline, "", *lines])
    print(text, flush=True)
    Path(f"{prefix}-verdict.txt").write_text(text + "\n")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
