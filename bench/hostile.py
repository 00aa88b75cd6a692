"""``python -m bench.hostile``: the hostile-client suite (testkit/hostile.py) against each HTTP
server candidate serving the same API with its default limits (flashteam's own server, uvicorn
and granian through the ASGI adapter, started as bench/test_http_servers.py starts them), and
the Markdown table of docs/performance.md#hostile-clients: which limit each server holds.

It is functional, not a timing: each probe allows the server its longest timeout (flashteam's
defaults: 10 s) plus a few seconds before it counts the server as not holding.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from bench.test_http_servers import COMMANDS, serving
from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN
from engine.local.redis_server import RedisServer
from engine.settings import DEFAULTS, Settings
from testkit import hostile

PATIENCE = max(DEFAULTS.header_timeout, DEFAULTS.body_timeout, DEFAULTS.write_timeout)


def run_suite(host: str, port: int) -> list[tuple[hostile.Probe, hostile.Seen]]:
    """Every probe against the server at (host, port), one after the other."""
    return [(probe, asyncio.run(probe.run(host, port, PATIENCE))) for probe in hostile.PROBES]


def _cell(probe: hostile.Probe, seen: hostile.Seen) -> str:
    statuses = ", ".join(map(str, seen.statuses)) or "no answer"
    closed = "closed" if seen.closed else "open"
    return f"{'holds' if probe.held(seen) else '**no**'} ({statuses}; {closed})"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        with RedisServer(tmp / "redis") as redis_server:
            settings = Settings(
                redis_url=redis_server.url,
                data_dir=tmp / "data",
                gateway_token=TEST_GATEWAY_TOKEN,
                admin_token=TEST_ADMIN_TOKEN,
            )
            metrics = tmp / "prometheus"
            metrics.mkdir()
            env = os.environ | settings.to_env() | {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
            found = {}
            for name in COMMANDS:
                with serving(name, env, tmp / f"{name}.log") as url:
                    host, port = url.removeprefix("http://").split(":")
                    found[name] = run_suite(host, int(port))
    print("| probe | what holding means | " + " | ".join(found) + " |")
    print("|---|---|" + "---|" * len(found))
    for n, probe in enumerate(hostile.PROBES):
        cells = " | ".join(_cell(*found[name][n]) for name in found)
        print(f"| {probe.name} | {probe.expected} | {cells} |")


if __name__ == "__main__":
    main()
