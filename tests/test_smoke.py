import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from engine import Engine, OrderState
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisServer, redis_server_binary
from testkit.factories import flash_campaign
from tests.test_api_load import gone, worker_pids


async def test_reserve_and_pay(engine: Engine) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now()))
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    paid = await engine.orders.pay(held.order.order_id, "u1", "pay-1")
    assert paid.state is OrderState.PAID


async def test_cluster_reserve(cluster_engine: Engine) -> None:
    await cluster_engine.campaigns.create(flash_campaign(await cluster_engine.runtime.now()))
    held = await cluster_engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert held.order.state is OrderState.HELD


async def test_audit_sees_a_planted_oversell(engine: Engine) -> None:
    from engine.audit import audit_campaign
    from engine.keys import keys_of

    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=1))
    await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert (await audit_campaign(engine.runtime, "sale")).ok
    await engine.runtime.redis.hincrby(keys_of("sale").inv, "a:sku-1", -1)
    audit = await audit_campaign(engine.runtime, "sale")
    assert any("below zero" in v for v in audit.violations)


def test_the_suite_runs_the_server_it_was_given(redis_server: RedisServer) -> None:
    """The suite's servers are the binary FLASHTEAM_REDIS_SERVER names when it is set (the
    test matrix's Valkey run), else redis-server from PATH: the run says what it tested."""
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        info = client.info("server")
    assert os.path.realpath(info["executable"]) == os.path.realpath(redis_server_binary())
    chosen = os.environ.get("FLASHTEAM_REDIS_SERVER", "redis-server")
    assert ("valkey_version" in info) == ("valkey" in os.path.basename(chosen))


# A process that starts an engine's API (as the tests and `flashteam run` do), prints the API
# process's id, and waits to be killed.
_STARTER = """
import sys, time
from pathlib import Path
from engine.local.launcher import ApiServer
api = ApiServer(sys.argv[1], Path(sys.argv[2]), workers=1)
api.start()
print(api.process.pid, flush=True)
time.sleep(120)
"""


def test_engine_processes_stop_with_the_process_that_started_them(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 of whatever started `flashteam serve` (a test run, `flashteam run`) leaves no
    orphan holding its port and its Redis connections: the API process stops too."""
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, redis_server.url, str(tmp_path / "api")],
        stdout=subprocess.PIPE,
    )
    assert starter.stdout is not None
    with starter.stdout:
        api = int(starter.stdout.readline())
    starter.kill()
    starter.wait()
    _gone([api], "the API process outlived its killed parent")


def test_api_workers_stop_with_their_serve(redis_server: RedisServer, tmp_path: Path) -> None:
    """kill -9 of `flashteam serve` (2 workers) stops its worker processes too: none is left
    serving the port beside a restarted serve's."""
    with ApiServer(redis_server.url, tmp_path / "api", workers=2) as api:
        assert api.process is not None
        serve = api.process.pid
        workers = sorted(worker_pids(serve))
        assert len(workers) == 2, workers
        os.kill(serve, signal.SIGKILL)
        api.process.wait()
        _gone(workers, "API workers outlived their killed serve")


def _gone(pids: list[int], failure: str) -> None:
    """Wait up to 30 s for every process of ``pids`` to end; else kill them and fail."""
    deadline = time.monotonic() + 30
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"{failure} by 30 s: {pids}")
        time.sleep(0.1)
