"""A sharded flash sale over HTTP on the suite's 3-master Redis Cluster (engine/shards.py):
`flashteam serve` with 2 API workers, each with its own coalescer and rebalancer, on the
Cluster; the campaign's 3 stock buckets on 3 masters.

- 5,000 concurrent reservations from 3,000 shoppers (limit 1) on 100 units: exactly 100 held,
  one per shopper, every other answer sold_out or limit_exceeded;
- the same with 1 unit per bucket and every shopper hashed to one bucket: the rebalancing
  carries the sale, exactly 3 held;
- retries with the same idempotency key answer the same order, across the rebalancing; the
  orders of every bucket are read and paid by their ids;
- a team campaign with shards, too many shards, and an edit of shards are refused (400).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from engine.keys import shard_of_order
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisClusterServers
from engine.shards import bucket_index
from testkit.factories import campaign_json, flash_campaign, team_campaign
from testkit.helpers import eventually
from tests.test_api import metric
from tests.test_api_load import ADM, GW, SKU, error_code, pool, stock_of, unique
from tests.test_concurrency import _attempting_users
from tests.test_shards import users_of_bucket

pytestmark = pytest.mark.cluster
Json = dict[str, Any]


@pytest.fixture(scope="module")
def cluster_api(
    redis_cluster: RedisClusterServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    """`flashteam serve --workers 2` on the suite's Redis Cluster."""
    data = tmp_path_factory.mktemp("cluster-api")
    with ApiServer(redis_cluster.url, data, extra={"redis_cluster": "1"}) as server:
        yield server


async def create(client: Any, campaign_id: str, stock: int) -> Json:
    campaign = dataclasses.replace(
        flash_campaign(datetime.now(UTC), campaign_id, stock=stock, limit=1, skus=(SKU,)),
        shards=3,
    )
    answer = await client.post("/v1/campaigns", json=campaign_json(campaign), headers=ADM)
    assert answer.status_code == 201, answer.text
    created: Json = answer.json()
    assert created["shards"] == 3 and created["status"] == "active"
    return created


async def reserve(client: Any, campaign_id: str, user: str, key: str) -> httpx.Response:
    body = {"user_id": user, "sku": SKU, "qty": 1, "idempotency_key": key}
    response: httpx.Response = await client.post(
        f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW
    )
    return response


async def test_5000_reserves_over_http_on_3_masters(cluster_api: ApiServer) -> None:
    campaign_id = unique("shard-rush")
    users = _attempting_users(5_000, 3_000, seed=3)
    async with pool(cluster_api.url) as client:
        await create(client, campaign_id, 100)
        answers = await asyncio.gather(
            *(reserve(client, campaign_id, u, f"k{i}") for i, u in enumerate(users))
        )
        stock = await stock_of(client, campaign_id)
        won = [(i, a.json()) for i, a in enumerate(answers) if a.status_code == 201]
        held = [order for _, order in won]
        retried = await asyncio.gather(
            *(reserve(client, campaign_id, o["user_id"], f"k{i}") for i, o in won)
        )

    assert Counter(a.status_code for a in answers) == {201: 100, 409: 4_900}
    codes = Counter(error_code(a) for a in answers if a.status_code == 409)
    assert set(codes) <= {"sold_out", "limit_exceeded"}, codes
    assert len({o["user_id"] for o in held}) == 100, "a user holds more than the limit"
    buckets = Counter(shard_of_order(o["order_id"]) for o in held)
    assert len(buckets) == 3, buckets
    assert (stock["initial"], stock["available"], stock["held"]) == (100, 0, 100)
    assert [r.status_code for r in retried] == [201] * 100
    assert [r.json()["order_id"] for r in retried] == [o["order_id"] for o in held]
    assert all(r.json()["replayed"] for r in retried)


async def test_one_unit_per_bucket_every_shopper_on_one_bucket(cluster_api: ApiServer) -> None:
    campaign_id = unique("shard-lean")
    shoppers = users_of_bucket(1, 3_000)
    attempts = [*shoppers, *shoppers[:2_000]]
    async with pool(cluster_api.url) as client:
        before = await rebalancing(client)
        await create(client, campaign_id, 3)
        answers = await asyncio.gather(
            *(reserve(client, campaign_id, u, f"k{i}") for i, u in enumerate(attempts))
        )
        stock = await stock_of(client, campaign_id)
        held = [a.json() for a in answers if a.status_code == 201]
        read = [
            await client.get(
                f"/v1/orders/{o['order_id']}", params={"user_id": o["user_id"]}, headers=GW
            )
            for o in held
        ]
        paid = [
            await client.post(
                f"/v1/orders/{o['order_id']}/pay",
                json={"user_id": o["user_id"], "payment_ref": f"pay-{o['user_id']}"},
                headers=GW,
            )
            for o in held
        ]
        after = await stock_of(client, campaign_id)

        async def saved() -> dict[str, float] | None:
            """the 2 units moved counted (the workers save their counts about once a second)"""
            counters = await rebalancing(client)
            return counters if counters["units_moved"] - before["units_moved"] >= 2 else None

        counted = await eventually(saved, 10)

    assert Counter(a.status_code for a in answers) == {201: 3, 409: 4_997}
    refused = {(u, error_code(a)) for u, a in zip(attempts, answers, strict=True) if a.is_error}
    assert {code for _, code in refused} <= {"sold_out", "limit_exceeded"}
    holders = {o["user_id"] for o in held}
    assert {u for u, code in refused if code == "limit_exceeded"} <= holders
    assert all(bucket_index(o["user_id"], 3) == 1 for o in held)
    assert len({shard_of_order(o["order_id"]) for o in held}) == 1
    assert (stock["available"], stock["held"]) == (0, 3)
    assert [r.status_code for r in read] == [200] * 3
    assert [p.json()["state"] for p in paid] == ["paid"] * 3
    assert (after["held"], after["paid"], after["available"]) == (0, 3, 0)
    # /metrics (either worker) counts what both workers' rebalancers did: the 2 units of the
    # other buckets moved into bucket 1, in 1 or 2 transfers; none gave up.
    moved = {name: counted[name] - before[name] for name in counted}
    assert moved["units_moved"] == 2 and 1 <= moved["transfers"] <= 2, moved
    assert moved["gave_up"] == 0, moved


async def rebalancing(client: Any) -> dict[str, float]:
    """The rebalancer counters of /metrics."""
    text = (await client.get("/metrics")).text
    counters = {}
    for name in ("transfers", "units_moved", "pending_finished", "gave_up"):
        value = metric(text, f"flashteam_rebalancer_{name}_total")
        assert value is not None, f"{name} missing from /metrics"
        counters[name] = value
    return counters


async def test_team_campaigns_and_edits_refuse_shards(cluster_api: ApiServer) -> None:
    now = datetime.now(UTC)
    team = campaign_json(team_campaign(now, unique("shard-team"))) | {"shards": 3}
    flat = campaign_json(flash_campaign(now, unique("shard-flat")))
    async with pool(cluster_api.url, 2) as client:
        refused = await client.post("/v1/campaigns", json=team, headers=ADM)
        too_many = await client.post("/v1/campaigns", json=flat | {"shards": 17}, headers=ADM)
        created = await client.post("/v1/campaigns", json=flat, headers=ADM)
        edited = await client.request(
            "PATCH", f"/v1/campaigns/{flat['id']}", json={"shards": 3}, headers=ADM
        )
    assert refused.status_code == 400 and error_code(refused) == "validation_error"
    # A team campaign's body takes one bucket (/openapi.json says so): the answer names the field.
    assert "<= 1 - at `$.shards`" in refused.json()["error"]["message"]
    assert too_many.status_code == 400
    assert created.status_code == 201 and created.json()["shards"] == 1
    assert edited.status_code == 400, "shards is fixed at creation"
