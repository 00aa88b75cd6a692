"""The `flashteam` command line: run, reaper, worker, reconcile, demo (`flashteam --help`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import uvloop

from engine.core import Engine
from engine.demo import DemoPlan, run_demo
from engine.errors import ConfigurationError, EngineError
from engine.reconcile import reconcile
from engine.redis_server import RedisServer
from engine.settings import Settings
from engine.worker import FlushWorker

log = logging.getLogger("flashteam")


@contextlib.contextmanager
def _redis_for(settings: Settings, data_dir: Path) -> Iterator[Settings]:
    """The settings to use: as given when FLASHTEAM_REDIS_URL is set, else with a private
    redis-server (AOF on, noeviction) started under ``data_dir`` and stopped on exit."""
    if settings.redis_url is not None:
        yield settings
        return
    with RedisServer(data_dir / "redis", appendfsync=settings.appendfsync) as server:
        log.info("private redis-server on %s (data in %s)", server.url, server.data_dir)
        yield settings.with_(redis_url=server.url)


async def _until_signalled() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


@contextlib.asynccontextmanager
async def _engine(settings: Settings) -> AsyncIterator[Engine]:
    engine = await Engine.open(settings)
    try:
        yield engine
    finally:
        await engine.close()


async def _run(settings: Settings) -> int:
    stop = await _until_signalled()
    async with _engine(settings) as engine:
        worker = FlushWorker(engine.runtime)
        print(f"flashteam is running on Redis {settings.redis_url}", flush=True)
        print(f"  durable store: {_store_name(settings)}")
        print("  running: the reaper (expires held orders within 1 s of their deadline)")
        print(f"  running: the flush worker {worker.name} (Redis Streams -> SQL)")
        print("  not yet built: the HTTP API (see the issues)")
        print("  stop with Ctrl-C", flush=True)
        await asyncio.gather(engine.reaper.run(stop), worker.run(stop))
    print("flashteam stopped", flush=True)
    return 0


def _store_name(settings: Settings) -> str:
    url = settings.database_url
    if url is not None and url.startswith(("postgresql://", "postgres://")):
        return "PostgreSQL " + url.split("@")[-1]
    return f"SQLite {settings.sqlite_path}"


async def _worker(settings: Settings, drain: bool) -> int:
    async with _engine(settings) as engine:
        worker = FlushWorker(engine.runtime)
        if drain:
            moved = await worker.drain()
            print(f"drained: {moved} entries flushed, {worker.dead_lettered} dead-lettered")
            return 0
        stop = await _until_signalled()
        log.info("flush worker %s running on %s", worker.name, settings.redis_url)
        await worker.run(stop)
        log.info("flush worker %s stopped after %d entries", worker.name, worker.flushed)
    return 0


async def _reconcile(settings: Settings, campaign_id: str) -> int:
    async with _engine(settings) as engine:
        result = await reconcile(engine.runtime, campaign_id)
    print("\n".join(result.lines) or f"no orders or teams for {campaign_id}")
    if result.unflushed:
        print(f"note: {result.unflushed} events are not flushed yet: run the worker first")
    if result.ok:
        print(f"reconcile {campaign_id}: Redis and SQL agree")
        return 0
    print(f"reconcile {campaign_id}: {len(result.differences)} differences", file=sys.stderr)
    return 1


async def _reaper(settings: Settings) -> int:
    stop = await _until_signalled()
    async with _engine(settings) as engine:
        log.info("reaper running every %.2f s on %s", settings.reaper_interval, settings.redis_url)
        await engine.reaper.run(stop)
    return 0


async def _demo(settings: Settings, plan: DemoPlan) -> int:
    async with _engine(settings) as engine:
        lines: list[str] = []
        ok = await run_demo(engine, plan, lines)
    print("\n".join(lines), flush=True)
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashteam",
        description="Flash-sale and team-join engine on atomic Redis Lua scripts. "
        "Configuration comes from FLASHTEAM_* environment variables (see README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "run",
        help="start everything locally: a private redis-server under FLASHTEAM_DATA_DIR "
        "(unless FLASHTEAM_REDIS_URL is set), SQLite, the reaper and the flush worker",
    )
    sub.add_parser("reaper", help="run only the reaper against FLASHTEAM_REDIS_URL")
    worker = sub.add_parser(
        "worker", help="run the flush worker (outbox streams -> SQL) against FLASHTEAM_REDIS_URL"
    )
    worker.add_argument(
        "--drain", action="store_true", help="flush until every stream is empty, then exit"
    )
    rec = sub.add_parser(
        "reconcile",
        help="compare a campaign's orders and teams in Redis with SQL; exit 1 on a difference",
    )
    rec.add_argument("campaign", help="campaign id")
    demo = sub.add_parser(
        "demo",
        help="simulate a flash sale and a team sale on a throw-away private Redis and check "
        "the invariants",
    )
    plan = DemoPlan()
    demo.add_argument("--shoppers", type=int, default=plan.shoppers, help="%(default)s")
    demo.add_argument("--stock", type=int, default=plan.stock, help="%(default)s")
    demo.add_argument("--limit", type=int, default=plan.limit, help="units per user; %(default)s")
    demo.add_argument("--pay-rate", type=float, default=plan.pay_rate, help="%(default)s")
    demo.add_argument("--cancel-rate", type=float, default=plan.cancel_rate, help="%(default)s")
    demo.add_argument("--seed", type=int, default=plan.seed, help="%(default)s")
    demo.add_argument("--team-shoppers", type=int, default=plan.team_shoppers, help="%(default)s")
    demo.add_argument("--team-size", type=int, default=plan.team_size, help="%(default)s")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flashteam` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else logging.WARNING
        if args.command == "demo"
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
        if args.command == "demo":
            plan = DemoPlan(
                shoppers=args.shoppers,
                stock=args.stock,
                limit=args.limit,
                pay_rate=args.pay_rate,
                cancel_rate=args.cancel_rate,
                seed=args.seed,
                team_shoppers=args.team_shoppers,
                team_size=args.team_size,
            )
            with tempfile.TemporaryDirectory(prefix="flashteam-demo-") as tmp:
                demo_settings = settings.with_(
                    redis_url=None, database_url=None, data_dir=Path(tmp), rate_limit=0
                )
                with _redis_for(demo_settings, Path(tmp)) as ready:
                    return _serve(lambda: _demo(ready, plan))
        if args.command == "reaper":
            return _serve(lambda: _reaper(settings))
        if args.command == "worker":
            return _serve(lambda: _worker(settings, args.drain))
        if args.command == "reconcile":
            return _serve(lambda: _reconcile(settings, args.campaign))
        with _redis_for(settings, settings.data_dir) as ready:
            return _serve(lambda: _run(ready))
    except (ConfigurationError, EngineError) as exc:
        print(f"flashteam: {exc}", file=sys.stderr)
        return 2


def _serve(main_coro: Callable[[], Awaitable[int]]) -> int:
    async def runner() -> int:
        return await main_coro()

    return uvloop.run(runner())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
