"""The naive reference of target T2: a reservation endpoint as a first FastAPI version would
be written, the baseline that the engine's HTTP reserve and batch endpoint are compared with.

``POST /reserve`` decodes the same JSON body as the engine's reserve (a pydantic model) and
runs one Lua script on Redis: if the stock key is above zero, DECR it and answer 201, else
409. No auth, no user or order record, no idempotency, no per-user limit, no outbox.
bench/test_http.py serves it as a naive deployment would, and with the server settings the
engine's API ran under uvicorn: ``uvicorn bench.naive:app`` with 2 workers (as many as the
engine's API), uvloop, httptools and no access log; ``NAIVE_REDIS_URL`` and
``NAIVE_STOCK_KEY`` name its Redis and its key.
"""

from __future__ import annotations

import os

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

REDIS_URL, STOCK_KEY = "NAIVE_REDIS_URL", "NAIVE_STOCK_KEY"

DECR = """
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
if stock > 0 then
  redis.call('DECR', KEYS[1])
  return 1
end
return 0
"""


class ReserveIn(BaseModel):
    user_id: str
    sku: str
    qty: int
    idempotency_key: str


client = aioredis.Redis.from_url(os.environ.get(REDIS_URL, "redis://127.0.0.1:6379/0"))
decrement = client.register_script(DECR)
key = os.environ.get(STOCK_KEY, "naive:stock")
app = FastAPI(title="naive reference")


@app.post("/reserve", status_code=201)
async def reserve(order: ReserveIn) -> dict[str, object]:
    if await decrement(keys=[key]) != 1:
        raise HTTPException(409, "sold out")
    return {"reserved": True, "user_id": order.user_id, "sku": order.sku, "qty": order.qty}
