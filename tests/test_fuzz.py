"""Hypothesis against every route of the running server: order, team and campaign ids of
every shape (real ones, ones naming no order, malformed ones) and arbitrary JSON bodies
(deep, duplicated keys, wrong types, hostile text). No answer may be a 5xx, and no repair
may follow (the repair counters of /metrics stay where they were).

It runs on the session's shared `flashteam serve` (the ``api`` fixture) with the admin token,
so admin routes are fuzzed too, on a flash and a team campaign of its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.local.launcher import ApiServer
from testkit.factories import campaign_json, flash_campaign, team_campaign
from tests.test_api import AD, SKU, now
from tests.test_security import _REPAIRS

_TAG = uuid.uuid4().hex[:10]
FLASH, TEAM = f"fz-flash-{_TAG}", f"fz-team-{_TAG}"
ROUTES = [
    ("POST", "/v1/campaigns"),
    ("GET", "/v1/campaigns/{campaign}"),
    ("PATCH", "/v1/campaigns/{campaign}"),
    ("POST", "/v1/campaigns/{campaign}/invalidate"),
    ("POST", "/v1/campaigns/{campaign}/orders"),
    ("GET", "/v1/campaigns/{campaign}/stats"),
    ("POST", "/v1/campaigns/{campaign}/teams"),
    ("GET", "/v1/campaigns/{campaign}/teams"),
    ("POST", "/v1/campaigns/{campaign}/teams/quick-join"),
    ("POST", "/v1/orders/{order}/pay"),
    ("POST", "/v1/orders/{order}/cancel"),
    ("POST", "/v1/orders/{order}/refund"),
    ("GET", "/v1/orders/{order}"),
    ("GET", "/v1/users/{user}/orders"),
    ("POST", "/v1/teams/{team}/join"),
    ("GET", "/v1/teams/{team}"),
    ("GET", "/v1/teams/{team}/orders"),
    ("POST", "/v1/batch"),
    ("GET", "/v1/live"),
    ("GET", "/live/{user}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
]

# The fuzzed campaigns (and ids naming none); invalidating one of them is fine: every answer
# must still be a 4xx or a success.
campaigns = st.sampled_from([FLASH, TEAM, "nope", "0", "a" * 64]) | st.text(min_size=1)
numbers = st.sampled_from(["0", "1", "2", "00001", "99999999", "9" * 18, "9" * 19, "-1", ""])
buckets = st.sampled_from(["", ".b1", ".b7", ".b9999", ".b0", ".b01"])
orders = st.builds(lambda c, b, n: f"{c}{b}.o{n}", campaigns, buckets, numbers) | st.text()
teams = st.builds(lambda c, n: f"{c}.t{n}", campaigns, numbers) | st.text()
users = st.sampled_from(["alice", "bob", "", "a:b", "x" * 65]) | st.text()

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
fields = st.sampled_from(
    ["user_id", "sku", "qty", "idempotency_key", "payment_ref", "amount", "restock", "title"]
)
bodies = (
    st.dictionaries(fields, values | st.sampled_from([SKU, "alice", 1, "k-1", "\x00", "\u202e"]))
    .map(lambda body: json.dumps(body).encode())
    .filter(lambda raw: len(raw) < 60_000)
    | st.builds(
        lambda items: json.dumps({"requests": items}).encode(),
        st.lists(st.fixed_dictionaries({"op": st.sampled_from(["pay", "reserve"])}), max_size=3),
    )
    | st.integers(min_value=1, max_value=40).map(lambda d: b"[" * d + b"]" * d)
    | st.integers(min_value=1, max_value=3000).map(lambda d: b"[" * d + b"}")
    | st.just(b'{"user_id": "alice", "user_id": "bob"}')
    | st.binary(max_size=64)
)


@pytest.fixture(scope="module")
def client(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=15, trust_env=False, headers=AD) as http:
        for campaign in (flash_campaign(now(), FLASH), team_campaign(now(), TEAM)):
            made = http.post("/v1/campaigns", json=campaign_json(campaign))
            assert made.status_code == 201, made.text
        body = {"user_id": "alice", "sku": SKU, "qty": 1, "idempotency_key": "k-1"}
        assert http.post(f"/v1/campaigns/{FLASH}/orders", json=body).status_code == 201
        assert http.post(f"/v1/campaigns/{TEAM}/teams", json=body).status_code == 201
        yield http


def repair_counts(http: httpx.Client) -> list[int]:
    return [int(n) for n in _REPAIRS.findall(http.get("/metrics").content)]


def test_no_input_reaches_a_5xx_or_a_repair(client: httpx.Client) -> None:
    before = repair_counts(client)

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(
        route=st.sampled_from(ROUTES),
        campaign=campaigns,
        order=orders,
        team=teams,
        user=users,
        body=bodies,
        query=st.dictionaries(st.sampled_from(["user_id", "viewer", "sku", "limit"]), users),
    )
    def one_request(
        route: tuple[str, str],
        campaign: str,
        order: str,
        team: str,
        user: str,
        body: bytes,
        query: dict[str, Any],
    ) -> None:
        method, template = route
        path = template.format(campaign=campaign, order=order, team=team, user=user)
        try:
            answer = client.request(method, path, content=body, params=query)
        except httpx.InvalidURL:
            return  # a path the client itself cannot send
        assert answer.status_code < 500, f"{method} {path} {body!r}: {answer.text}"

    one_request()
    assert repair_counts(client) == before, "a fuzzed request started a repair"
