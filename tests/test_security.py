"""The engine's trust boundaries through HTTP against the real server (docs/security.md): ids
that name no order, deep and ambiguous input, payment references and amounts, free text.

Every test here runs on the session's shared `flashteam serve` (the ``api`` fixture) with its
own campaign ids, except the text-field test, which runs on both durable stores.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from engine import Engine, Settings, ValidationError
from engine.api.app import Api
from engine.local.launcher import ApiServer
from engine.local.redis_server import RedisServer
from testkit.factories import campaign_json, flash_campaign, make_settings, team_campaign
from tests.test_api import (
    AD,
    GW,
    SKU,
    create,
    expect_error,
    new_flash,
    now,
    ok,
    pay,
    reserve,
    stock_of,
    unique,
)

_REPAIRS = re.compile(rb"^flashteam_(?:recoveries_total|repairs_total\{[^}]*\}) (\d+)", re.M)


@pytest.fixture
async def http(api: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=30, trust_env=False) as client:
        yield client


async def repairs(http: httpx.AsyncClient) -> list[int]:
    """Every repair counter of /metrics (the total and one per reason)."""
    exposed = (await http.get("/metrics")).content
    counts = [int(n) for n in _REPAIRS.findall(exposed)]
    assert len(counts) > 1, exposed[-2000:]
    return counts


async def test_ids_that_name_no_order_are_404_and_repair_nothing(
    api: ApiServer, http: httpx.AsyncClient
) -> None:
    """Pay, cancel, refund, batch pay and reads of ids that name no order are 404
    order_not_found, no repair is counted or logged, and the honest reservations sent
    meanwhile all succeed."""
    campaign_id = await new_flash(http, "fence", stock=10_000, limit=1)
    held = ok(await reserve(http, campaign_id, "owner"), 201)
    other = unique("none")
    fakes = [
        f"{campaign_id}.b7.o1",  # a stock bucket the campaign does not have
        f"{campaign_id}.b1.o1",
        f"{campaign_id}.b9999.o1",
        f"{campaign_id}.o99999999",  # a number never issued
        f"{campaign_id}.o999999999999999999",
        f"{campaign_id}.o0",
        f"{campaign_id}.o00001",  # not the id of order 1
        f"{other}.o1",  # a campaign that does not exist
        f"{other}.b3.o5",
        "0.b1.o0",
        f"{held['order_id']}0000",
    ]
    before = await repairs(http)
    log_size = api.log.stat().st_size if api.log else 0

    async def honest() -> list[int]:
        statuses = []
        for n in range(40):
            answer = await reserve(http, campaign_id, f"shopper-{n}")
            statuses.append(answer.status_code)
        return statuses

    async def fake(order_id: str) -> None:
        calls = [
            ("POST", f"/v1/orders/{order_id}/pay", {"user_id": "owner", "payment_ref": "p-x"}, GW),
            ("POST", f"/v1/orders/{order_id}/cancel", {"user_id": "owner"}, GW),
            ("POST", f"/v1/orders/{order_id}/refund", {"restock": True}, AD),
            ("GET", f"/v1/orders/{order_id}", None, AD),
        ]
        for method, path, body, headers in calls:
            answer = await http.request(method, path, json=body, headers=headers)
            expect_error(answer, "order_not_found")
        item = {"op": "pay", "order_id": order_id, "user_id": "owner", "payment_ref": "p-y"}
        results = ok(await http.post("/v1/batch", json={"requests": [item]}, headers=GW))
        assert results["results"][0]["status"] == 404, results
        assert results["results"][0]["body"]["error"]["code"] == "order_not_found"

    statuses, *_ = await asyncio.gather(honest(), *(fake(order_id) for order_id in fakes))
    assert statuses == [201] * 40
    assert await repairs(http) == before
    assert api.log is not None
    with api.log.open("rb") as log:
        log.seek(log_size)
        assert b"untrusted" not in log.read()
    assert (await stock_of(http, campaign_id))["held"] == 41
    ok(await pay(http, held["order_id"], "owner"))  # the real order is untouched


async def test_deep_json_is_a_400(api: ApiServer, http: httpx.AsyncClient) -> None:
    """A batch nesting 1,000 arrays (2 KB) is a 400 json_too_deep with nothing logged as a
    failure; so is any body past 8 levels; 8 levels are read as usual."""
    deep = b'{"requests":[' + b"[" * 1000 + b"]" * 1000 + b"]}"
    unpaired = b"[" * 5000 + b"}" + b"]" * 4999  # no pair to count: the parser's own limit
    assert api.log is not None
    log_size = api.log.stat().st_size
    for raw in (deep, unpaired):
        expect_error(await http.post("/v1/batch", content=raw, headers=GW), "json_too_deep")
    campaign_id = await new_flash(http, "deep")
    nested = {"user_id": "u1", "sku": SKU, "qty": 1, "idempotency_key": "k1"}
    body = {**nested, "extra": [[[[[[[[1]]]]]]]]}
    answer = await http.post(f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW)
    expect_error(answer, "json_too_deep")
    body["extra"] = [[[[[[[1]]]]]]]  # 8 levels with the object: an unknown field, not too deep
    answer = await http.post(f"/v1/campaigns/{campaign_id}/orders", json=body, headers=GW)
    expect_error(answer, "validation_error")
    assert (await stock_of(http, campaign_id))["held"] == 0
    with api.log.open("rb") as log:
        log.seek(log_size)
        tail = log.read()
    assert b"Traceback" not in tail and b"RecursionError" not in tail


async def test_one_payment_reference_pays_one_order(http: httpx.AsyncClient) -> None:
    """A reference that paid one order is refused on another (409 payment_ref_used) and the
    first stays paid; the same order with the same reference is idempotent; an amount, when
    sent, must be the order's (leader price included), else 409 amount_mismatch."""
    campaign_id = await new_flash(http, "payref", limit=3)
    alice = ok(await reserve(http, campaign_id, "alice", qty=2), 201)
    bob = ok(await reserve(http, campaign_id, "bob"), 201)
    ok(await pay(http, alice["order_id"], "alice", "psp-1"))
    expect_error(await pay(http, bob["order_id"], "bob", "psp-1"), "payment_ref_used")
    item = {"op": "pay", "order_id": bob["order_id"], "user_id": "bob", "payment_ref": "psp-1"}
    batch = ok(await http.post("/v1/batch", json={"requests": [item]}, headers=GW))
    assert batch["results"][0]["body"]["error"]["code"] == "payment_ref_used", batch
    first = ok(await http.get(f"/v1/orders/{alice['order_id']}?user_id=alice", headers=GW))
    assert (first["state"], first["payment_ref"]) == ("paid", "psp-1")
    again = ok(await pay(http, alice["order_id"], "alice", "psp-1"))
    assert again["version"] == first["version"]
    second = ok(await http.get(f"/v1/orders/{bob['order_id']}?user_id=bob", headers=GW))
    assert second["state"] == "held"

    path = f"/v1/orders/{bob['order_id']}/pay"
    wrong = {"user_id": "bob", "payment_ref": "psp-2", "amount": bob["amount"] - 1}
    error = expect_error(await http.post(path, json=wrong, headers=GW), "amount_mismatch")
    assert error["amount"] == bob["amount"]
    assert alice["amount"] == 2 * bob["amount"]
    paid = ok(await http.post(path, json=wrong | {"amount": bob["amount"]}, headers=GW))
    assert paid["state"] == "paid"

    team = team_campaign(now(), unique("leader"), price=1000, leader_price=700)
    await create(http, team)
    seat = ok(
        await http.post(
            f"/v1/campaigns/{team.id}/teams",
            json={"user_id": "lead", "sku": SKU, "idempotency_key": "t1"},
            headers=GW,
        ),
        201,
    )
    order_path = f"/v1/orders/{seat['order_id']}/pay"
    full = {"user_id": "lead", "payment_ref": "psp-lead", "amount": 1000}
    expect_error(await http.post(order_path, json=full, headers=GW), "amount_mismatch")
    ok(await http.post(order_path, json=full | {"amount": 700}, headers=GW))


async def test_one_reading_of_every_input(http: httpx.AsyncClient) -> None:
    """A query parameter given twice and a JSON key given twice are 400s that change
    nothing, whichever copy a gateway would have read."""
    campaign_id = await new_flash(http, "dup")
    held = ok(await reserve(http, campaign_id, "alice"), 201)
    path = f"/v1/orders/{held['order_id']}?user_id=alice&user_id=bob"
    expect_error(await http.get(path, headers=GW), "validation_error")
    twice = f"/v1/campaigns/{campaign_id}/teams?sku={SKU}&sku=other"
    expect_error(await http.get(twice, headers=GW), "validation_error")
    body = (
        b'{"user_id": "alice", "user_id": "bob", "sku": "sku-1", "qty": 1, "idempotency_key": "k2"}'
    )
    answer = await http.post(f"/v1/campaigns/{campaign_id}/orders", content=body, headers=GW)
    error = expect_error(answer, "validation_error")
    assert "user_id" in error["message"]
    pay_twice = b'{"user_id": "alice", "payment_ref": "a", "payment_ref": "b"}'
    answer = await http.post(f"/v1/orders/{held['order_id']}/pay", content=pay_twice, headers=GW)
    expect_error(answer, "validation_error")
    assert (await stock_of(http, campaign_id))["held"] == 1
    assert (await stock_of(http, campaign_id))["paid"] == 0


@pytest.mark.parametrize(
    "title", ["nul\x00byte", "bell\x07", "c1\x85", "rtl\u202eoverride", "isolate\u2067x", "del\x7f"]
)
async def test_titles_refuse_control_characters_over_http(
    http: httpx.AsyncClient, title: str
) -> None:
    campaign = flash_campaign(now(), unique("title"))
    body = {**campaign_json(campaign), "title": title}
    expect_error(await http.post("/v1/campaigns", json=body, headers=AD), "validation_error")
    expect_error(await http.get(f"/v1/campaigns/{campaign.id}", headers=GW), "not_found")
    created = await new_flash(http, "titled")
    patch = await http.patch(f"/v1/campaigns/{created}", json={"title": title}, headers=AD)
    expect_error(patch, "validation_error")


async def test_titles_refuse_control_characters_on_both_stores(
    redis: aioredis.Redis, redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """NUL (which PostgreSQL refuses with an error a retry cannot fix, and SQLite stores),
    control and bidi-override characters are a ValidationError before any store is asked,
    in a new campaign and in an edit; printable text in any script is stored as given."""
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    async with await Engine.open(settings) as engine:
        start = await engine.runtime.now()
        fine = replace(flash_campaign(start, "fine", starts_in=600), title="春のセール — 50% off")
        await engine.campaigns.create(fine)
        for n, title in enumerate(["a\x00b", "tab\there", "x\u202ey", "z\u2069"]):
            with pytest.raises(ValidationError):
                replace(flash_campaign(start, f"bad-{n}"), title=title)
            with pytest.raises(ValidationError):
                await engine.campaigns.update("fine", {"title": title})
        stored = await engine.runtime.store.get_campaign("fine")
        assert stored is not None and stored.title == fine.title


async def test_a_rolling_token_rotation_refuses_no_valid_caller() -> None:
    """With the current and the next token of each role configured, both are accepted for
    their role (and the gateway's never for an admin route); an unknown one is a 401. The
    calls are refused by validation after the token check, so no engine is needed."""
    old_gw, new_gw = "gw-current-" + "0123456789abcdef" * 2, "gw-next-" + "fedcba9876543210" * 2
    old_admin, new_admin = "adm-current-" + "a1b2c3d4" * 4, "adm-next-" + "4d3c2b1a" * 4
    settings = Settings(gateway_token=f"{old_gw},{new_gw}", admin_token=f"{old_admin}, {new_admin}")
    transport = httpx.ASGITransport(app=Api(settings).app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:

        async def status(path: str, token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            return (await client.post(path, content=b"[]", headers=headers)).status_code

        for token in (old_admin, new_admin):
            assert await status("/v1/campaigns", token) == 400
            assert await status("/v1/campaigns/c1/orders", token) == 400
        for token in (old_gw, new_gw):
            assert await status("/v1/campaigns", token) == 403
            assert await status("/v1/campaigns/c1/orders", token) == 400
        assert await status("/v1/campaigns/c1/orders", old_gw[:-1] + "x") == 401
