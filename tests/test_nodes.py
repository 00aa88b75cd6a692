"""Several API nodes on one host (docs/operations.md#several-machines): each counts its own
requests on /metrics, even with the same data directory, and a second `flashteam serve` on a
port another instance already serves is refused unless asked (--share-port)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import httpx

from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN, ApiServer
from engine.local.redis_server import RedisServer
from testkit.helpers import eventually, run_cli
from tests.test_api import metric

OPENAPI = {"route": "GET /openapi.json", "outcome": "ok"}  # no health check asks for it


async def _ask(node: ApiServer, times: int) -> None:
    """``times`` requests on fresh connections (spread over the node's workers)."""
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=node.url, limits=fresh, trust_env=False) as client:
        for _ in range(times):
            assert (await client.get("/openapi.json")).status_code == 200


async def _counted(node: ApiServer) -> float:
    async with httpx.AsyncClient(base_url=node.url, trust_env=False) as client:
        text = (await client.get("/metrics")).text
    return metric(text, "flashteam_http_request_seconds_count", **OPENAPI) or 0.0


async def test_two_api_nodes_with_one_data_dir_count_their_own_requests(
    api_redis: RedisServer, tmp_path: Path
) -> None:
    data = tmp_path / "api"  # the same FLASHTEAM_DATA_DIR, the default workers
    with ApiServer(api_redis.url, data) as first, ApiServer(api_redis.url, data) as second:
        await _ask(first, 7)
        await _ask(second, 3)
        for node, expected in ((first, 7), (second, 3)):
            await eventually(partial(_equal, node, expected), 10, what=f"{expected} on {node.url}")
        await _ask(first, 2)  # the first node still counts after the second started
        await eventually(partial(_equal, first, 9), 10, what="9 requests on the first node")
        assert await _counted(second) == 3


async def _equal(node: ApiServer, expected: int) -> bool | None:
    return await _counted(node) == expected or None


async def test_a_second_instance_on_a_served_port_is_refused(
    api_redis: RedisServer, tmp_path: Path
) -> None:
    with ApiServer(api_redis.url, tmp_path / "api", workers=1) as first:
        env = {
            **os.environ,
            "FLASHTEAM_REDIS_URL": api_redis.url,
            "FLASHTEAM_DATA_DIR": str(tmp_path / "second"),
            "FLASHTEAM_GATEWAY_TOKEN": TEST_GATEWAY_TOKEN,
            "FLASHTEAM_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
        }
        code, _, err = await run_cli("serve", "--port", str(first.port), env=env, limit=60)
        assert code == 2, err
        assert f"127.0.0.1:{first.port} is already served by another process" in err
        assert "--share-port" in err
        assert (await _counted(first)) == 0  # the first instance is untouched, still serving
