"""/openapi.json, generated from the route table and the same msgspec structs the handlers
decode and encode with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import UnionType
from typing import Any

import msgspec

from engine.api.schemas import ErrorOut, Id

_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"\{(\w+)\}")
_QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
}
_ERRORS = {
    "400": "validation_error: a field breaks its type, range or pattern, or a query parameter "
    "or JSON key is given twice; json_too_deep: arrays and objects nested past 8 levels",
    "401": "unauthorized: missing or unknown bearer token",
    "403": "forbidden: the admin token is needed, or the order is another user's",
    "404": "not_found; order_not_found: the order id names no order",
    "409": "a business rule said no: sold_out, limit_exceeded, order_limit_exceeded, "
    "not_started, ended, invalidated, hold_expired, team_full, team_closed, already_in_team, "
    "team_in_progress, not_editable, idempotency_mismatch, invalid_state, already_exists, "
    "payment_ref_used, amount_mismatch",
    "413": "payload_too_large",
    "429": "rate_limited (see the Retry-After header)",
    "503": "unavailable: Redis or SQL cannot be reached; retry with the same idempotency key "
    "or payment_ref. payment_pending (pay, or reading a paid order): recorded, not declined, "
    "SQL has not confirmed it yet; retry with the same payment_ref (or the read) to learn the "
    "outcome",
}

# What a struct's own schema cannot say: an edit changes at least one field (an empty one is
# a 400).
_EXTRA: dict[str, dict[str, Any]] = {"CampaignPatch": {"minProperties": 1}}

# The calls a client chains (OpenAPI links): what an answer's ids lead to. Keyed by the
# operationId whose success answer carries the id; each link names the operationId it leads to,
# the parameter it fills, and the body fields it fills too (the campaign's first sku for a
# reservation, the order's owner for its payment), the rest of the body left to the caller.
_Link = tuple[str, str, str, dict[str, str]]
_FIRST_SKU = {"sku": "$response.body#/items/0/sku"}
_LINKS: dict[str, dict[str, _Link]] = {
    "post_v1_campaigns": {
        "GetCampaign": (
            "get_v1_campaigns_by_campaign_id",
            "campaign_id",
            "$response.body#/id",
            {},
        ),
        "Reserve": (
            "post_v1_campaigns_by_campaign_id_orders",
            "campaign_id",
            "$response.body#/id",
            _FIRST_SKU,
        ),
        "OpenTeam": (
            "post_v1_campaigns_by_campaign_id_teams",
            "campaign_id",
            "$response.body#/id",
            _FIRST_SKU,
        ),
        "QuickJoin": (
            "post_v1_campaigns_by_campaign_id_teams_quick-join",
            "campaign_id",
            "$response.body#/id",
            _FIRST_SKU,
        ),
    },
    "post_v1_campaigns_by_campaign_id_orders": {
        "Pay": (
            "post_v1_orders_by_order_id_pay",
            "order_id",
            "$response.body#/order_id",
            {"user_id": "$response.body#/user_id"},
        ),
        "Cancel": (
            "post_v1_orders_by_order_id_cancel",
            "order_id",
            "$response.body#/order_id",
            {"user_id": "$response.body#/user_id"},
        ),
        "GetOrder": ("get_v1_orders_by_order_id", "order_id", "$response.body#/order_id", {}),
    },
}
_SEAT_LINKS: dict[str, _Link] = {
    "Join": ("post_v1_teams_by_team_id_join", "team_id", "$response.body#/team_id", {}),
    "GetTeam": ("get_v1_teams_by_team_id", "team_id", "$response.body#/team_id", {}),
    "Pay": (
        "post_v1_orders_by_order_id_pay",
        "order_id",
        "$response.body#/order_id",
        {"user_id": "$response.body#/order/user_id"},
    ),
}
for _seat in (
    "post_v1_campaigns_by_campaign_id_teams",
    "post_v1_campaigns_by_campaign_id_teams_quick-join",
    "post_v1_teams_by_team_id_join",
):
    _LINKS[_seat] = _SEAT_LINKS


@dataclass(frozen=True, slots=True)
class Operation:
    """One route as documented: what it takes and what it answers."""

    method: str
    path: str
    summary: str
    auth: bool
    admin: bool
    body: type | UnionType | None  # a union of tagged structs: a discriminated oneOf
    out: type | None
    status: int
    query: tuple[tuple[str, bool], ...]


def openapi_document(operations: list[Operation]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every operation."""
    types = [t for op in operations for t in (op.body, op.out) if t is not None]
    refs, components = msgspec.json.schema_components([*types, ErrorOut], ref_template=_REF)
    for name, extra in _EXTRA.items():
        if name in components:
            components[name] |= extra
    schema_of = dict(zip(types, refs[: len(types)], strict=True))
    id_schema = msgspec.json.schema(Id)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schema_of, id_schema)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flashteam",
            "version": "1",
            "description": "Flash-sale and team-join (group-buy) engine. Storefront calls take "
            "the gateway token, campaign management and refunds the admin token "
            "(`Authorization: Bearer <token>`). Errors: "
            '`{"error": {"code": "<snake_case>", "message": "...", ...details}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(
    op: Operation, schema_of: dict[type | UnionType, Any], id_schema: dict[str, Any]
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _path_schema(name, id_schema)}
        for name in _PARAM.findall(op.path)
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": required,
            "schema": _QUERY_SCHEMAS.get(name, id_schema),
        }
        for name, required in op.query
    ]
    responses: dict[str, Any] = {}
    if op.out is None:
        responses[str(op.status)] = {"description": "OK"}
    else:
        content = {"application/json": {"schema": schema_of[op.out]}}
        responses[str(op.status)] = {"description": "OK", "content": content}
    error = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorOut")}}}
    for status, description in _ERRORS.items():
        if op.auth or status in ("404",):
            responses[status] = {"description": description, "content": error}
    operation_id = op.method.lower() + _PARAM.sub(r"by_\1", op.path).replace("/", "_")
    links = _LINKS.get(operation_id)
    if links:
        responses[str(op.status)]["links"] = {
            name: {"operationId": target, "parameters": {param: value}}
            | ({"requestBody": body} if body else {})
            for name, (target, param, value, body) in links.items()
        }
    out: dict[str, Any] = {
        "summary": op.summary.splitlines()[0],
        "operationId": operation_id,
        "parameters": params,
        "responses": responses,
    }
    if op.auth:
        out["security"] = [{"bearer": []}]
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of[op.body]}},
        }
    return out


def _path_schema(name: str, id_schema: dict[str, Any]) -> dict[str, Any]:
    if name == "order_id":
        # <campaign>.o<n>, or <campaign>.b<bucket>.o<n> in a sharded campaign (engine/shards.py)
        return {
            "type": "string",
            "pattern": r"^[A-Za-z0-9_-]{1,64}(\.b[1-9][0-9]{0,3})?\.o[0-9]{1,18}$",
        }
    if name == "team_id":
        return {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}\.t[0-9]{1,18}$"}
    return id_schema
