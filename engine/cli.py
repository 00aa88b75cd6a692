"""The `flashteam` command line: run, serve, worker, reaper, reconcile, recover, archive, demo
(--help)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import uvloop

from engine.api import server
from engine.core import Engine
from engine.demo import DemoPlan, run_demo
from engine.errors import Archived, ConfigurationError, EngineError
from engine.local.launcher import LocalEngine, StartFailed
from engine.reconcile import reconcile
from engine.settings import API_HOST, API_PORT, API_WORKERS, Settings
from engine.worker import FlushWorker

log = logging.getLogger("flashteam")


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


def _serve(settings: Settings, host: str, port: int, workers: int, share_port: bool) -> int:
    """The HTTP API on flashteam's own server (engine/api/server.py), ``workers`` processes
    on one port; refused when another process already listens there, unless ``share_port``
    (the port's workers share it through SO_REUSEPORT, so another instance would start
    beside a stale one without a word)."""
    settings.require_tokens()  # refuse before any worker starts
    if not share_port and server.port_in_use(host, port):
        raise ConfigurationError(
            f"{host}:{port} is already served by another process (another `flashteam serve`?): "
            "stop it, choose another --port, or pass --share-port to serve beside it"
        )
    log.info("API on http://%s:%d with %d worker(s)", host, port, workers)
    if workers == 1:
        return server.run(settings, host, port, workers)
    # prometheus_client keeps every worker's histograms in a directory of this instance's
    # own, removed when it stops: no other instance, whatever its data dir, touches it.
    with tempfile.TemporaryDirectory(prefix="flashteam-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        return server.run(settings, host, port, workers)


def _run(settings: Settings, host: str, port: int, workers: int, flush_workers: int) -> int:
    """Everything locally (see LocalEngine): a private redis-server unless FLASHTEAM_REDIS_URL
    is set, then the API, the flush workers and the reaper, each restarted when it exits,
    until Ctrl-C or SIGTERM (0) or a process's crash loop (1)."""
    if flush_workers < 1:
        raise ConfigurationError("--flush-workers must be 1 or more")
    local = LocalEngine(
        settings, host=host, port=port, workers=workers, flush_workers=flush_workers
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: local.request_stop())
    try:
        with local:
            _print_running(local)
            code = local.supervise()
    except StartFailed as exc:
        print(f"flashteam: {exc}", file=sys.stderr)
        code = 1
    print("flashteam stopped", flush=True)
    return code


def _print_running(local: LocalEngine) -> None:
    ready = local.settings
    print(f"flashteam is running: API {local.url} ({local.workers} workers)", flush=True)
    print(f"  Redis:          {ready.redis_name}")
    print(f"  durable store:  {_store_name(ready)}")
    flush = "flush worker" if local.flush_workers == 1 else f"{local.flush_workers} flush workers"
    print(f"  {flush} and reaper running")
    # Tokens this run generated are printed for whoever started it; tokens from the
    # environment are that environment's secrets, never echoed.
    for name, tokens in zip(("gateway", "admin"), ready.require_tokens(), strict=True):
        if name in local.generated:
            print(f"  {name} token:  {tokens[0]}  (generated)")
        else:
            print(f"  {name} token:  {len(tokens)} from FLASHTEAM_{name.upper()}_TOKEN")
    print(f"  try: curl {local.url}/readyz", flush=True)
    print("  stop with Ctrl-C", flush=True)


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
        log.info("flush worker %s running on %s", worker.name, settings.redis_name)
        await worker.run(stop)
        log.info("flush worker %s stopped after %d entries", worker.name, worker.flushed)
    return 0


async def _reconcile(settings: Settings, campaign_id: str) -> int:
    async with _engine(settings) as engine:
        archive = await engine.runtime.store.archive_of(campaign_id)
        if archive is not None:
            print(
                f"reconcile {campaign_id}: archived {archive.archived_at:%Y-%m-%d %H:%M:%S} "
                "UTC: SQL holds it alone, nothing in Redis to compare"
            )
            return 0
        result = await reconcile(engine.runtime, campaign_id)
    print("\n".join(result.lines) or f"no orders or teams for {campaign_id}")
    if result.differences:
        print("differences:")
        print("\n".join(f"  {line}" for line in result.differences))
    if result.unflushed:
        print(
            f"note: {result.unflushed} events are not flushed yet: run the worker first "
            "(until then differences are expected)"
        )
    if result.ok:
        print(
            f"reconcile {campaign_id}: Redis and SQL agree "
            f"({result.orders} orders, {result.teams} teams)"
        )
        return 0
    if result.differences:
        print(
            f"reconcile {campaign_id}: {len(result.differences)} differences "
            f"({result.orders_differing} of {result.orders} orders, "
            f"{result.teams_differing} of {result.teams} teams differ)",
            file=sys.stderr,
        )
    if result.unflushed:
        print(
            f"reconcile {campaign_id}: not final, {result.unflushed} events not flushed: "
            "run `flashteam worker --drain`, then reconcile again",
            file=sys.stderr,
        )
    return 1


async def _recover(settings: Settings, campaign_id: str) -> int:
    async with _engine(settings) as engine:
        await engine.recovery.wait_idle()  # a repair the start-up began, if any
        try:
            done = await engine.recovery.repair(campaign_id, "manual")
        except Archived:
            print(f"recover {campaign_id}: archived: SQL holds it alone, nothing to repair")
            return 0
    how = "repaired by another process" if done.waited else "repaired from SQL"
    print(
        f"recover {campaign_id}: {how} in {done.seconds:.2f} s: {done.orders} orders, "
        f"{done.teams} teams, {done.settled} settled, {done.flushed} outbox entries flushed"
    )
    return 0


async def _archive(settings: Settings, campaign_id: str | None) -> int:
    """One campaign now (whatever its grace period), or with no campaign a pass over every
    campaign due; exit 1 when one that was asked for stays in Redis."""
    async with _engine(settings) as engine:
        if campaign_id is None:
            done = await engine.archiver.run_once()
            if done.skipped:
                print("archive: another process is archiving right now; try again", file=sys.stderr)
                return 1
            for archived in done.archived:
                print(f"archive {archived}: archived")
            for refused, reason in done.refused.items():
                print(f"archive {refused}: not archived: {reason}")
            if not done.archived and not done.refused:
                print("archive: no campaign is due")
            return 0
        result = await engine.archiver.archive(campaign_id, wait=_ARCHIVE_WAIT)
    if result.archived:
        print(
            f"archive {campaign_id}: archived: {result.keys} Redis keys deleted in "
            f"{result.seconds:.2f} s (longest command {result.longest_ms:.1f} ms); SQL "
            "holds it alone"
        )
        return 0
    print(f"archive {campaign_id}: not archived: {_WHY_NOT.get(result.reason, result.reason)}")
    for line in result.differences:
        print(f"  {line}")
    return 1


_ARCHIVE_WAIT = 30.0  # seconds `flashteam archive` waits for another process's pass
_WHY_NOT = {
    "live": "it has not ended and was not invalidated",
    "holds": "held orders await payment or expiry (the reaper ends them)",
    "teams": "open teams await filling or expiry (the reaper ends them)",
    "unflushed": "its outbox is not flushed yet (is the flush worker running?)",
    "differs": "Redis and SQL differ (run `flashteam reconcile`)",
    "busy": "another process kept the archiver's lock",
}


async def _reaper(settings: Settings) -> int:
    stop = await _until_signalled()
    async with _engine(settings) as engine:
        log.info("reaper running every %.2f s on %s", settings.reaper_interval, settings.redis_name)
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
        description="Flash-sale and team-join engine on atomic Redis Lua scripts.\n"
        "Configuration comes from the FLASHTEAM_* environment variables listed below.",
        epilog="environment variables:\n" + "\n".join(Settings.describe()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="start everything locally: a private redis-server under FLASHTEAM_DATA_DIR "
        "(unless FLASHTEAM_REDIS_URL is set), SQLite, the HTTP API, the flush worker and the "
        "reaper; prints the URL and the tokens (generated unless set)",
    )
    serve = sub.add_parser(
        "serve",
        help="run only the HTTP API against FLASHTEAM_REDIS_URL (needs FLASHTEAM_GATEWAY_TOKEN "
        "and FLASHTEAM_ADMIN_TOKEN)",
    )
    for command in (run, serve):
        command.add_argument("--host", default=API_HOST, help="%(default)s")
        command.add_argument("--port", type=int, default=API_PORT, help="%(default)s")
        command.add_argument(
            "--workers", type=int, default=API_WORKERS, help="API worker processes; %(default)s"
        )
    run.add_argument(
        "--flush-workers",
        type=int,
        default=1,
        help="flush worker processes, sharing the outbox (one is enough while the lag on "
        "/metrics stays low); %(default)s",
    )
    serve.add_argument(
        "--share-port",
        action="store_true",
        help="start even when another process already serves --port (both then take "
        "connections: a rolling restart)",
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
        help="compare a campaign's orders and teams in Redis with SQL, record by record; "
        "exit 1 on any difference, or while events are not flushed yet",
        description="Compare every order (user, sku, qty, amount, state, version, team, "
        "payment ref) and every team (leader, sku, size, state, held, paid, version, members) "
        "of the campaign in Redis with SQL. Prints totals per item and state as a summary, "
        "then each difference by id with the field and both values, or the side a record is "
        "missing from. Run it after `flashteam worker --drain`: while events of the campaign "
        "are still in its outbox stream, SQL is behind, differences are expected and the "
        "command exits 1 even if none shows. Exit status: 0 when Redis and SQL agree and "
        "nothing is left to flush, 1 otherwise.",
    )
    rec.add_argument("campaign", help="campaign id")
    recover = sub.add_parser(
        "recover",
        help="repair a campaign's Redis state from SQL now (what the engine does by itself "
        "after Redis lost writes; docs/faults.md)",
        description="Fence the campaign (its operations answer 503 recovering), flush what "
        "its outbox still holds, rebuild every Redis key of it from SQL (stock, per-user "
        "units, orders, teams, indexes, idempotency records, sequences past every durable "
        "id) and lift the fence. Safe to run while the engine runs and to run twice; when "
        "another process is repairing the campaign already, waits for it.",
    )
    recover.add_argument("campaign", help="campaign id")
    archive = sub.add_parser(
        "archive",
        help="archive a finished campaign out of Redis into SQL now (the reaper does it by "
        "itself FLASHTEAM_ARCHIVE_AFTER seconds after a campaign ended; docs/lifecycle.md)",
        description="Seal the campaign, compare it with SQL record by record and bucket by "
        "bucket, record it as archived in SQL and delete its Redis keys in small steps. It "
        "must be over (ended or invalidated), with no held order, no open team and its outbox "
        "flushed; one that differs from SQL stays in Redis. Reads keep working from SQL, "
        "refunds too. Safe to run twice and alongside the engine; exits 1 when the campaign "
        "stays in Redis, with the reason. Without a campaign: one pass over every campaign "
        "due (past its grace period).",
    )
    archive.add_argument("campaign", nargs="?", help="campaign id; none: every one due")
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
                throwaway = settings.with_(
                    redis_url=None, database_url=None, data_dir=Path(tmp), rate_limit=0
                )
                with LocalEngine(throwaway, services=()) as local:
                    return _loop(lambda: _demo(local.settings, plan))
        if args.command == "reaper":
            return _loop(lambda: _reaper(settings))
        if args.command == "worker":
            return _loop(lambda: _worker(settings, args.drain))
        if args.command == "recover":
            return _loop(lambda: _recover(settings, args.campaign))
        if args.command == "reconcile":
            return _loop(lambda: _reconcile(settings, args.campaign))
        if args.command == "archive":
            return _loop(lambda: _archive(settings, args.campaign))
        if args.workers < 1:
            raise ConfigurationError("--workers must be 1 or more")
        if args.command == "serve":
            return _serve(settings, args.host, args.port, args.workers, args.share_port)
        return _run(settings, args.host, args.port, args.workers, args.flush_workers)
    except (ConfigurationError, EngineError) as exc:
        print(f"flashteam: {exc}", file=sys.stderr)
        return 2


def _loop(main_coro: Callable[[], Awaitable[int]]) -> int:
    async def runner() -> int:
        return await main_coro()

    return uvloop.run(runner())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
