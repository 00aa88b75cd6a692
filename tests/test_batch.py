"""``POST /v1/batch`` (engine/api/batch.py, docs/http.md#batch) over real sockets, against
the session's `flashteam serve` (two workers): each item answers exactly as its single call
would (status and body, the same error codes and details), in order; duplicates and retries
inside one batch and across batches replay; items of two campaigns; a bad item fails alone;
a bad batch is refused whole; and 3,000 reservations sent in concurrent batches on 100 units
hold exactly 100.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from engine.local.launcher import ApiServer
from testkit.factories import flash_campaign
from tests.test_api import (
    GW,
    Json,
    create,
    expect_error,
    new_flash,
    new_team,
    now,
    ok,
    unique,
)

SKU = "sku-1"


@pytest.fixture
async def http(api: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=30, trust_env=False) as client:
        yield client


def reserve(campaign_id: str, user: str, key: str, qty: int = 1, sku: str = SKU) -> Json:
    return {
        "op": "reserve",
        "campaign_id": campaign_id,
        "user_id": user,
        "sku": sku,
        "qty": qty,
        "idempotency_key": key,
    }


async def batch(http: httpx.AsyncClient, items: list[Json]) -> list[tuple[int, Json]]:
    """The batch's results as (status, body), checking the envelope."""
    body = ok(await http.post("/v1/batch", json={"requests": items}, headers=GW))
    assert list(body) == ["results"] and len(body["results"]) == len(items)
    return [(r["status"], r["body"]) for r in body["results"]]


def code_of(result: tuple[int, Json]) -> str:
    _, body = result
    assert list(body) == ["error"], body
    return str(body["error"]["code"])


async def single(http: httpx.AsyncClient, item: Json) -> tuple[int, Json]:
    """The same call made on its own (the single-call route)."""
    item = dict(item)
    op = item.pop("op")
    if op == "reserve":
        path = f"/v1/campaigns/{item.pop('campaign_id')}/orders"
    elif op == "open_team":
        path = f"/v1/campaigns/{item.pop('campaign_id')}/teams"
    elif op == "quick_join":
        path = f"/v1/campaigns/{item.pop('campaign_id')}/teams/quick-join"
    elif op == "join":
        path = f"/v1/teams/{item.pop('team_id')}/join"
    else:
        path = f"/v1/orders/{item.pop('order_id')}/pay"
    answer = await http.post(path, json=item, headers=GW)
    return answer.status_code, answer.json()


async def test_each_outcome_is_the_single_calls(http: httpx.AsyncClient) -> None:
    flash = await new_flash(http, stock=3, limit=2, skus=(SKU, "sku-2"))
    later = unique("later")
    await create(http, flash_campaign(now(), later, starts_in=3600))
    first = await batch(
        http,
        [
            reserve(flash, "u1", "a"),  # 201
            reserve(flash, "u1", "a"),  # the same key again: replayed
            reserve(flash, "u1", "b", sku="sku-2"),  # 201 (u1 now at the limit of 2)
            reserve(flash, "u1", "c"),  # limit_exceeded
            reserve(flash, "u1", "a", sku="sku-2"),  # idempotency_mismatch
            reserve(flash, "u2", "a", qty=2),  # 201: sku-1 has 3 - 1 - 2 = 0 left
            reserve(flash, "u3", "a"),  # sold_out
            reserve(flash, "u3", "b", sku="nope"),  # not_found
            reserve(later, "u3", "c"),  # not_started
            reserve(unique("nobody"), "u3", "d"),  # not_found: no such campaign
            {"op": "reserve", "campaign_id": flash, "user_id": "u4"},  # validation_error
            {"op": "refund", "order_id": f"{flash}.o1"},  # validation_error: not a batch op
        ],
    )
    statuses = [status for status, _ in first]
    assert statuses == [201, 201, 201, 409, 409, 201, 409, 404, 409, 404, 400, 400], first
    assert first[0][1]["replayed"] is False and first[1][1]["replayed"] is True
    assert first[0][1]["order_id"] == first[1][1]["order_id"]
    codes = [code_of(first[i]) for i in (3, 4, 6, 7, 8, 9, 10, 11)]
    assert codes == [
        "limit_exceeded",
        "idempotency_mismatch",
        "sold_out",
        "not_found",
        "not_started",
        "not_found",
        "validation_error",
        "validation_error",
    ]
    assert first[6][1]["error"]["available"] == 0
    assert first[10][1]["error"]["index"] == 10
    # Each error body is the single call's, detail for detail (a campaign with stock to
    # spare for the limit: a sold-out item is answered from the sold-out fast path a moment).
    roomy = await new_flash(http, stock=100, limit=1)
    limited = await batch(http, [reserve(roomy, "v1", "a"), reserve(roomy, "v1", "b")])
    assert code_of(limited[1]) == "limit_exceeded"
    assert await single(http, reserve(roomy, "v1", "c")) == limited[1]
    assert await single(http, reserve(flash, "u3", "b", sku="nope")) == first[7]
    assert await single(http, reserve(later, "u3", "c")) == first[8]
    assert await single(http, reserve(flash, "u1", "a", sku="sku-2")) == first[4]

    # Payments: the owner's (200), a retry with its reference (200), another user's (403),
    # an unknown order (404); a retry of the whole earlier batch replays every reservation.
    order = first[0][1]["order_id"]
    paid = await batch(
        http,
        [
            {"op": "pay", "order_id": order, "user_id": "u1", "payment_ref": "p1"},
            {"op": "pay", "order_id": order, "user_id": "u1", "payment_ref": "p1"},
            {"op": "pay", "order_id": order, "user_id": "u2", "payment_ref": "p1"},
            {"op": "pay", "order_id": f"{flash}.o999", "user_id": "u1", "payment_ref": "p"},
            {"op": "pay", "order_id": "not-an-order", "user_id": "u1", "payment_ref": "p"},
        ],
    )
    assert [s for s, _ in paid] == [200, 200, 403, 404, 400]
    assert paid[0][1]["state"] == paid[1][1]["state"] == "paid"
    again = await batch(http, [reserve(flash, "u1", "a"), reserve(flash, "u2", "a", qty=2)])
    assert [(s, b["replayed"], b["order_id"]) for s, b in again] == [
        (201, True, first[0][1]["order_id"]),
        (201, True, first[5][1]["order_id"]),
    ]
    assert again[0][1]["state"] == "paid"


async def test_team_items_and_two_campaigns_in_one_batch(http: httpx.AsyncClient) -> None:
    team = await new_team(http, team_size=2, stock=10, limit=1)
    flash = await new_flash(http, stock=5)
    opened = await batch(
        http,
        [
            {"op": "open_team", "campaign_id": team, "user_id": "lead", "sku": SKU,
             "idempotency_key": "o"},
            reserve(flash, "lead", "r"),  # another campaign, same batch
            {"op": "quick_join", "campaign_id": team, "user_id": "q1", "sku": SKU,
             "idempotency_key": "q"},
        ],
    )  # fmt: skip
    assert [s for s, _ in opened] == [201, 201, 201]
    seat, held, quick = (body for _, body in opened)
    assert seat["opened"] is True and held["campaign_id"] == flash
    assert quick["opened"] is True  # no open team to join yet: a new pending one
    team_id, leader_order = seat["team_id"], seat["order_id"]
    joined = await batch(
        http,
        [
            {"op": "pay", "order_id": leader_order, "user_id": "lead", "payment_ref": "p"},
            {"op": "join", "team_id": team_id, "user_id": "lead", "idempotency_key": "j"},
        ],
    )
    assert joined[0][0] == 200
    assert code_of(joined[1]) == "already_in_team"  # paid first (item order), then joined
    filled = await batch(
        http,
        [
            {"op": "join", "team_id": team_id, "user_id": "m1", "idempotency_key": "j"},
            {"op": "join", "team_id": team_id, "user_id": "m2", "idempotency_key": "j"},
            {"op": "join", "team_id": f"{team}.t999", "user_id": "m3", "idempotency_key": "j"},
        ],
    )
    assert filled[0][0] == 201 and filled[0][1]["team_id"] == team_id
    assert [code_of(filled[1]), code_of(filled[2])] == ["team_full", "not_found"]


async def test_a_bad_batch_is_refused_whole(http: httpx.AsyncClient) -> None:
    flash = await new_flash(http, stock=1000)
    post = http.post
    expect_error(await post("/v1/batch", content=b"not json", headers=GW), "validation_error")
    bodies: list[Json] = [{}, {"requests": []}, {"requests": {}}, {"requests": [1], "more": 1}]
    for body in bodies:
        expect_error(await post("/v1/batch", json=body, headers=GW), "validation_error")
    too_many = [reserve(flash, f"u{n}", "k") for n in range(257)]
    error = expect_error(
        await post("/v1/batch", json={"requests": too_many}, headers=GW), "validation_error"
    )
    assert "256" in error["message"]
    huge = {"requests": [reserve(flash, "u", "k" * 128)] * 600}
    expect_error(await post("/v1/batch", json=huge, headers=GW), "payload_too_large")
    expect_error(
        await post("/v1/batch", json={"requests": [reserve(flash, "u", "k")]}), "unauthorized"
    )
    stock = ok(await http.get(f"/v1/campaigns/{flash}", headers=GW))["stock"][0]
    assert stock["held"] == 0, "a refused batch changed nothing"


async def test_3000_reservations_in_concurrent_batches_hold_exactly_100(
    http: httpx.AsyncClient,
) -> None:
    flash = await new_flash(http, stock=100, limit=1)
    users = [f"u{n}" for n in range(3_000)]
    chunks = [users[i : i + 60] for i in range(0, len(users), 60)]

    async def send(chunk: list[str]) -> list[tuple[int, Json]]:
        return await batch(http, [reserve(flash, user, "k") for user in chunk])

    results = [r for part in await asyncio.gather(*(send(c) for c in chunks)) for r in part]
    held = [body for status, body in results if status == 201]
    refused = [code_of(r) for r in results if r[0] != 201]
    assert len(held) == 100 and set(refused) == {"sold_out"} and len(refused) == 2_900
    assert len({body["order_id"] for body in held}) == 100
    assert len({body["user_id"] for body in held}) == 100
    stock = ok(await http.get(f"/v1/campaigns/{flash}", headers=GW))["stock"][0]
    assert (stock["available"], stock["held"]) == (0, 100)
