"""Several Redis Cluster seeds in FLASHTEAM_REDIS_URL (docs/operations.md): with the first
seed's master dead and its replica promoted, a new engine, `flashteam serve` and the
`reconcile` and `worker --drain` commands start on the next seed of the list."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from engine.core import Engine
from engine.errors import ConfigurationError
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisClusterServers
from engine.settings import Settings
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import run_cli


@pytest.mark.cluster
async def test_new_processes_start_on_the_next_seed_when_the_first_is_dead(
    replicated_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    seeds = ",".join(server.url for server in replicated_cluster.servers[:2])
    cluster = make_settings(replicated_cluster.url, tmp_path, redis_cluster=True)
    settings = cluster.with_(redis_url=seeds)
    async with await Engine.open(settings) as engine:
        await engine.campaigns.create(flash_campaign(await engine.runtime.now(), "seeded"))
        held = await engine.flash.reserve("seeded", "u1", "sku-1", 1, "k1")
    killed = replicated_cluster.kill_master(0)  # the first seed
    await asyncio.to_thread(replicated_cluster.wait_promoted, killed)

    async with await Engine.open(settings) as engine:
        assert await engine.orders.get(held.order.order_id) == held.order
    env = {
        **os.environ,
        "FLASHTEAM_REDIS_URL": seeds,
        "FLASHTEAM_REDIS_CLUSTER": "1",
        "FLASHTEAM_DATABASE_URL": f"sqlite:///{settings.sqlite_path}",
    }
    for command in (("worker", "--drain"), ("reconcile", "seeded")):
        code, out, err = await run_cli(*command, env=env)
        assert code == 0, (command, out, err)
        assert "RedisClusterUnreachable" not in err
    extra = {"redis_cluster": "1"}
    with ApiServer(seeds, tmp_path / "api", workers=1, extra=extra) as api:
        async with httpx.AsyncClient(base_url=api.url, trust_env=False) as client:
            assert (await client.get("/readyz")).status_code == 200


def test_several_urls_need_a_cluster() -> None:
    with pytest.raises(ConfigurationError, match="FLASHTEAM_REDIS_CLUSTER=1"):
        Settings(redis_url="redis://127.0.0.1:7000/0,redis://127.0.0.1:7001/0")
