"""`make loadtest` (``python -m loadtests.run``): the opening of a sale, end to end, with a verdict.

1. Starts the whole engine locally as ``flashteam run`` does (a private redis-server, SQLite,
   the API, the flush worker and the reaper) under ``var/loadtest/<name>/``, or targets a
   running one with ``--host`` (then ``--redis-url`` and ``--database-url`` let it check).
2. Creates a flash campaign and a team campaign that open ``--open-after`` seconds later.
3. Runs Locust headless (``loadtests/locustfile.py``) with the chosen shape for ``--run-time``
   seconds, writing ``<name>.html`` and ``<name>_stats.csv`` (and the rest) under ``--reports``.
4. Waits for the flush worker to drain the outbox, stops the local engine, and checks SPEC
   section 6 (no oversell, no stock leak, per-user limits, no over-filled team, SQL equal to
   Redis, nothing dead-lettered, every acknowledged payment durable).
5. Prints the SPEC section 10 KPIs and the verdict (also saved as ``<name>-verdict.txt``);
   exits 1 if any check fails, 2 on bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop

from engine.core import Engine
from engine.keys import ID_PATTERN
from engine.redis_server import RedisServer, free_port
from engine.settings import Settings
from engine.worker import FlushWorker
from loadtests.plan import DEFAULT_MIX, SHAPES, parse_mix
from loadtests.verdict import (
    Verdict,
    campaign_kpis,
    judge,
    read_locust_json,
    request_table,
    wait_flushed,
)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@dataclass(slots=True)
class Target:
    """The engine under load: its URL, tokens, and where its state lives (for the verdict)."""

    host: str
    gateway_token: str
    admin_token: str
    redis_url: str
    database_url: str
    process: subprocess.Popen[bytes] | None = None  # the local `flashteam run`, if ours

    def stop(self) -> None:
        """Stop a local engine (SIGTERM: the API drains, the worker finishes its batch)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def settings(self) -> Settings:
        return Settings.from_env(
            {"FLASHTEAM_REDIS_URL": self.redis_url, "FLASHTEAM_DATABASE_URL": self.database_url}
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="Reproduce the opening of a flash sale and a team sale with Locust, then "
        "check the SPEC section 6 invariants and print the section 10 KPIs. Without --host it "
        "starts the whole engine locally (private redis-server, SQLite) and stops it after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_argument_group("target (default: a local engine started for the run)")
    target.add_argument("--host", help="URL of a running engine, e.g. http://10.0.0.5:8000")
    target.add_argument(
        "--redis-url", help="its Redis (FLASHTEAM_REDIS_URL), needed with --host for the verdict"
    )
    target.add_argument(
        "--database-url", help="its SQL store (FLASHTEAM_DATABASE_URL), needed with --host"
    )
    target.add_argument("--api-workers", type=int, default=2, help="local API processes")
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
        help="run Locust as a distributed master and wait for this many workers "
        "(`locust -f loadtests/locustfile.py --worker --master-host <this host>`)",
    )
    sale = p.add_argument_group("the sale")
    sale.add_argument("--items", type=int, default=2, help="items per campaign")
    sale.add_argument("--stock", type=int, default=1000, help="units per item")
    sale.add_argument("--team-size", type=int, default=3, help="seats per team")
    sale.add_argument("--hold-seconds", type=int, default=10, help="payment window of a hold")
    sale.add_argument("--team-ttl", type=int, default=20, help="seconds a team stays open")
    sale.add_argument(
        "--open-after", type=float, default=2.0, help="seconds from start to the sale's opening"
    )
    out = p.add_argument_group("output")
    out.add_argument("--reports", type=Path, default=ROOT / "loadtests" / "reports")
    out.add_argument("--name", help="report name (default: <shape>-<UTC time>)")
    out.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / "var" / "loadtest",
        help="where a local engine keeps its Redis, SQLite and log (in <name>/)",
    )
    out.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to wait for the flush"
    )
    return p


def _check(args: argparse.Namespace) -> str | None:
    """A usage problem with the options, or None."""
    try:
        parse_mix(args.mix)
    except ValueError as exc:
        return str(exc)
    if args.name is not None and not re.fullmatch(ID_PATTERN, f"lt-{args.name}-flash"):
        return "--name: letters, digits, '-' and '_' only, at most 55 characters"
    if args.host and not (args.redis_url and args.database_url):
        return "--host needs --redis-url and --database-url: the verdict reads both stores"
    if args.host and not (os.environ.get("FLASHTEAM_GATEWAY_TOKEN") and _admin_token()):
        return "--host needs FLASHTEAM_GATEWAY_TOKEN and FLASHTEAM_ADMIN_TOKEN in the environment"
    for name in ("users", "run_time", "items", "stock", "hold_seconds", "team_ttl", "api_workers"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be 1 or more"
    if args.spawn_rate <= 0 or not 0 <= args.pay_rate + args.cancel_rate <= 1:
        return "--spawn-rate must be positive; --pay-rate + --cancel-rate between 0 and 1"
    if not 2 <= args.team_size <= 100:
        return "--team-size must be between 2 and 100"
    return None


def _admin_token() -> str | None:
    return os.environ.get("FLASHTEAM_ADMIN_TOKEN")


@contextlib.contextmanager
def local_engine(data_dir: Path, workers: int, log: Path) -> Iterator[Target]:
    """`flashteam run` on a free port with its own redis-server and SQLite under data_dir
    (emptied first: a run's name owns its data dir)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    with RedisServer(data_dir / "redis") as redis, log.open("ab") as log_file:
        port = free_port()
        target = Target(
            host=f"http://127.0.0.1:{port}",
            gateway_token=secrets.token_urlsafe(24),
            admin_token=secrets.token_urlsafe(24),
            redis_url=redis.url,
            database_url=f"sqlite:///{(data_dir / 'flashteam.db').resolve()}",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTEAM_")}
        env.update(
            FLASHTEAM_REDIS_URL=target.redis_url,
            FLASHTEAM_DATABASE_URL=target.database_url,
            FLASHTEAM_DATA_DIR=str(data_dir.resolve()),
            FLASHTEAM_GATEWAY_TOKEN=target.gateway_token,
            FLASHTEAM_ADMIN_TOKEN=target.admin_token,
        )
        target.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "run",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(target)
            yield target
        finally:
            target.stop()


def _wait_ready(target: Target) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if target.process is not None and target.process.poll() is not None:
            raise RuntimeError(f"the engine exited with {target.process.returncode}")
        with contextlib.suppress(OSError):
            if _http(target, "GET", "/readyz", None, "")[0] == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the engine was not ready within 60 s")


def _http(target: Target, method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target.host + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def create_campaigns(target: Target, args: argparse.Namespace, name: str) -> list[str]:
    """A flash and a team campaign opening ``--open-after`` seconds from now."""
    opens = datetime.now(UTC) + timedelta(seconds=args.open_after)
    team = {"team_size": args.team_size, "team_ttl_seconds": args.team_ttl}
    ids = []
    for kind, price, limit, extra in (("flash", 1999, 2, {}), ("team", 999, 1, team)):
        campaign = {
            "id": f"lt-{name}-{kind}",
            "kind": kind,
            "title": f"load test {name}: {kind} sale",
            "starts_at": opens.isoformat(),
            "ends_at": (opens + timedelta(days=1)).isoformat(),
            "items": [
                {"sku": f"{kind}-{i}", "price": price, "stock": args.stock}
                for i in range(1, args.items + 1)
            ],
            "per_user_limit": limit,
            "hold_seconds": args.hold_seconds,
            **extra,
        }
        status, reply = _http(target, "POST", "/v1/campaigns", campaign, target.admin_token)
        if status != 201:
            raise RuntimeError(f"creating campaign {campaign['id']}: HTTP {status} {reply}")
        ids.append(str(campaign["id"]))
    return ids


def run_locust(target: Target, args: argparse.Namespace, prefix: Path, campaigns: list[str]) -> int:
    """Locust headless with the chosen shape; its CSV and HTML reports under ``prefix``."""
    env = {
        **os.environ,
        "FLASHTEAM_LOAD_SHAPE": args.shape,
        "FLASHTEAM_GATEWAY_TOKEN": target.gateway_token,
    }
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "--only-summary",
        "--json-file", str(prefix),
        "--host", target.host,
        "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate),
        "--run-time", f"{args.run_time}s",
        "--stop-timeout", "5",
        "--processes", str(args.processes),
        "--csv", str(prefix),
        "--html", f"{prefix}.html",
        "--loglevel", "WARNING",
        "--flash-campaign", campaigns[0],
        "--team-campaign", campaigns[1],
        "--mix", args.mix,
        "--pay-rate", str(args.pay_rate),
        "--cancel-rate", str(args.cancel_rate),
    ]  # fmt: skip
    if args.expect_workers > 0:
        i = command.index("--processes")
        command[i : i + 2] = ["--master", "--expect-workers", str(args.expect_workers)]
    elif args.processes == 1:
        i = command.index("--processes")
        del command[i : i + 2]
    return subprocess.run(command, env=env, cwd=ROOT, check=False).returncode


async def settle_and_judge(
    target: Target, args: argparse.Namespace, prefix: Path, campaigns: list[str]
) -> tuple[Verdict, list[str]]:
    """Drain, stop a local engine, then judge; returns the verdict and the report lines."""
    lines: list[str] = []
    async with await Engine.open(target.settings()) as engine:
        drained = await wait_flushed(engine, args.drain_timeout)
    lines.append(
        f"outbox drained {drained:.1f} s after the load ended"
        if drained is not None
        else f"outbox NOT drained within {args.drain_timeout:.0f} s"
    )
    if target.process is not None:
        target.stop()  # no reaper racing the checks; what it left in the outbox is flushed now
        async with await Engine.open(target.settings()) as engine:
            await FlushWorker(engine.runtime).drain()
    rows, counts = read_locust_json(Path(f"{prefix}.json"))
    async with await Engine.open(target.settings()) as engine:
        verdict = await judge(engine, campaigns, counts)
        lines += ["", "KPIs (SPEC section 10)"]
        for campaign_id in campaigns:
            lines += await campaign_kpis(engine, campaign_id)
    lines += ["", f"requests over {args.run_time} s (latency in ms)"]
    lines += request_table(rows, args.run_time)
    lines.append(f"  acknowledged payments: {counts.acknowledged_paid}")
    return verdict, lines


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except RuntimeError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        parser.error(problem)  # exits 2
    name = args.name or f"{args.shape}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    args.reports.mkdir(parents=True, exist_ok=True)
    prefix = args.reports.resolve() / name
    with contextlib.ExitStack() as stack:
        if args.host:
            target = Target(
                args.host.rstrip("/"),
                os.environ["FLASHTEAM_GATEWAY_TOKEN"],
                _admin_token() or "",
                args.redis_url,
                args.database_url,
            )
        else:
            data_dir = args.data_dir / name
            print(f"starting the engine under {data_dir} ...", flush=True)
            target = stack.enter_context(
                local_engine(data_dir, args.api_workers, data_dir / "engine.log")
            )
        campaigns = create_campaigns(target, args, name)
        headline = (
            f"{name}: {args.shape} load on {target.host}, {args.users} users at "
            f"{args.spawn_rate:g}/s for {args.run_time} s, mix {args.mix}; campaigns "
            f"{', '.join(campaigns)} ({args.items} items x {args.stock} units) open "
            f"{args.open_after:g} s in"
        )
        print(headline, flush=True)
        locust_code = run_locust(target, args, prefix, campaigns)
        verdict, lines = uvloop.run(settle_and_judge(target, args, prefix, campaigns))
    shown = prefix.relative_to(ROOT) if prefix.is_relative_to(ROOT) else prefix
    lines.append(f"  reports: {shown}.html, {shown}_stats.csv (Locust exit code {locust_code})")
    lines += ["", "invariants (SPEC section 6)", *verdict.lines()]
    text = "\n".join([headline, "", *lines])
    print(text, flush=True)
    Path(f"{prefix}-verdict.txt").write_text(text + "\n")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
