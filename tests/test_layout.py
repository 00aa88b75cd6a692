"""The several-machines layout of docs/operations.md#several-machines, run as written: every
line of deploy/several-machines/Procfile (two API nodes, two flush workers, two reapers) on
loopback, on one Redis and one PostgreSQL. A sale spread round robin over both API nodes,
each retry sent to the other node, lands whole in SQL; every process stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN
from engine.local.process import free_port
from engine.local.redis_server import RedisServer
from testkit.helpers import eventually, run_cli
from tests.test_api import new_flash, ok, pay, reserve

PROCFILE = Path(__file__).parent.parent / "deploy" / "several-machines" / "Procfile"
STOP_WITHIN = 30.0


def procfile() -> dict[str, str]:
    """The Procfile's processes: name -> command line."""
    lines = PROCFILE.read_text(encoding="utf-8").splitlines()
    return dict(
        (name.strip(), command.strip())
        for name, _, command in (
            line.partition(":") for line in lines if line.strip() and not line.startswith("#")
        )
    )


@pytest.fixture
def layout_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_the_several_machines_layout_runs_as_written(
    layout_redis: RedisServer, pg_url: str, tmp_path: Path
) -> None:
    ports = {"A_API_PORT": free_port(), "B_API_PORT": free_port()}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLASHTEAM_REDIS_URL": layout_redis.url,
        "FLASHTEAM_DATABASE_URL": pg_url,
        "FLASHTEAM_GATEWAY_TOKEN": TEST_GATEWAY_TOKEN,
        "FLASHTEAM_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
        "FLASHTEAM_STATE": str(tmp_path / "state"),
        "API_HOST": "127.0.0.1",
        **{name: str(port) for name, port in ports.items()},
    }
    processes = await asyncio.to_thread(_start, env, tmp_path)
    assert sorted(processes) == ["a-api", "a-reaper", "a-worker", "b-api", "b-reaper", "b-worker"]
    try:
        async with contextlib.AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=15, trust_env=False)
                )
                for p in ports.values()
            ]
            for node in nodes:
                await eventually(partial(_ready, node), 60, what=f"{node.base_url} ready")
            campaign_id = await _sale(nodes)

        async def clean() -> bool:
            code, _, _ = await run_cli("reconcile", campaign_id, env=env)
            return code == 0

        await eventually(clean, 60, what="the sale flushed and reconciled", every=0.5)
        assert all(p.poll() is None for p in processes.values()), _logs(tmp_path)
    finally:
        codes = await asyncio.to_thread(_stop, processes)
    assert set(codes.values()) == {0}, (codes, _logs(tmp_path))


def _start(env: dict[str, str], tmp_path: Path) -> dict[str, subprocess.Popen[bytes]]:
    """Every line of the Procfile in a shell that execs it, as a supervisor would, each in
    its own process group, its output in ``<name>.log``."""
    processes = {}
    for name, command in procfile().items():
        with (tmp_path / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(
                ["sh", "-c", f"exec {command}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    return processes


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
    """SIGTERM to every process group; each exit code."""
    for process in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    return {name: process.wait(STOP_WITHIN) for name, process in processes.items()}


async def _ready(node: httpx.AsyncClient) -> bool:
    try:
        return (await node.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def _sale(nodes: list[httpx.AsyncClient]) -> str:
    """40 shoppers for 30 units, round robin over the nodes, each reservation sent again to
    the other node (the same order back, or sold_out from both), every third one left
    unpaid, the others paid on the other node; the campaign id."""
    campaign_id = await new_flash(nodes[0], "layout", stock=30, limit=1)
    paid = 0
    for n in range(40):
        here, there = nodes[n % 2], nodes[(n + 1) % 2]
        user, key = f"shopper{n}", f"key{n}"
        first = await reserve(here, campaign_id, user, key=key)
        again = await reserve(there, campaign_id, user, key=key)
        if first.status_code != 201:
            assert first.json()["error"]["code"] == again.json()["error"]["code"] == "sold_out"
            continue
        order_id = ok(first, 201)["order_id"]
        assert ok(again, again.status_code)["order_id"] == order_id
        if n % 3:
            ok(await pay(there, order_id, user))
            paid += 1
    assert paid == 20
    return campaign_id


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
        for log in sorted(tmp_path.glob("*.log"))
    )
