"""Request coalescing: concurrent reserve, join and quick-join calls for one campaign go to
Redis together, as one ``batch.lua`` call, instead of one EVALSHA each (one EVALSHA per
request tops out near 14k/s here, batches of 64-256 near 100k/s: docs/performance.md, target
T1, and docs/architecture.md#request-coalescing).

A call joins its campaign's pending batch; the batch is sent when it reaches ``max_batch``
requests or at the end of the window (by default the current turn of the event loop: every
request that arrived in it, and no timer). ``batch.lua`` runs each request exactly as its own
script would, in arrival order, and returns one reply per request (``Scripts.send``); each
caller decodes its own (``engine.scripts.decode``), so it gets its own result or rejection,
idempotency and rate limit, unchanged. A batch of one uses the single script. This module
only groups calls and resolves their futures; a rejection comes back as a ``Refusal`` value,
which the engine module that asked raises.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.models import Reservation, TeamSeatResult
from engine.runtime import Runtime
from engine.scripts import JOIN, PROBE, QUICK, RESERVE, Call, Outcome, Refusal, decode


class _Batch:
    """The pending requests of one campaign and the futures their callers wait on."""

    __slots__ = ("calls", "futures")

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.futures: list[asyncio.Future[list[Any]]] = []  # each request's reply


class Coalescer:
    """Per-campaign batches of order-creating calls (all arguments already validated); per
    stock bucket for a sharded campaign (engine/shards.py)."""

    def __init__(self, rt: Runtime) -> None:
        self._scripts = rt.scripts
        settings = rt.settings
        self._max = settings.coalesce_batch if settings.coalesce else 1
        self._window = settings.coalesce_window_us / 1_000_000
        self._pending: dict[str, _Batch] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def reserve(
        self,
        campaign_id: str,
        user_id: str,
        sku: str,
        qty: int,
        idempotency_key: str,
        *,
        probe: bool = False,
        shard: str | None = None,
    ) -> Reservation | Refusal:
        """A reservation; ``probe``: the item was sold out a moment ago, so only replay the
        key's original order if there is one (else SoldOut with no units available).
        ``shard``: the user's stock bucket of a sharded campaign (engine/shards.py); its
        requests are coalesced per bucket."""
        call = Call(PROBE if probe else RESERVE, user_id, sku, "", qty, idempotency_key)
        outcome = await self._submit(campaign_id, call, shard or campaign_id)
        assert not isinstance(outcome, TeamSeatResult)  # RESERVE and PROBE decode to the others
        return outcome

    async def join(
        self, campaign_id: str, user_id: str, team_id: str, idempotency_key: str
    ) -> TeamSeatResult | Refusal:
        """A seat in the open team."""
        call = Call(JOIN, user_id, "", team_id, 0, idempotency_key)
        outcome = await self._submit(campaign_id, call, campaign_id)
        assert not isinstance(outcome, Reservation)  # JOIN decodes to the others
        return outcome

    async def quick_join(
        self, campaign_id: str, user_id: str, sku: str, idempotency_key: str
    ) -> TeamSeatResult | Refusal:
        """A seat in the best open team of the sku, or a new pending team."""
        call = Call(QUICK, user_id, sku, "", 0, idempotency_key)
        outcome = await self._submit(campaign_id, call, campaign_id)
        assert not isinstance(outcome, Reservation)  # QUICK decodes to the others
        return outcome

    async def _submit(self, campaign_id: str, call: Call, shard: str) -> Outcome:
        """Queue one request for its campaign (or stock bucket, ``shard``) and wait for its
        own outcome."""
        if self._max <= 1:  # coalescing off: one script call per request
            return await self._scripts.one(shard, call)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()
        batch = self._pending.get(shard)
        if batch is None:
            batch = self._pending[shard] = _Batch()
            if self._window > 0:
                loop.call_later(self._window, self._flush, shard, batch)
            else:
                loop.call_soon(self._flush, shard, batch)
        batch.calls.append(call)
        batch.futures.append(done)
        if len(batch.calls) >= self._max:
            self._flush(shard, batch)
        return decode(call, await done, campaign_id)

    def _flush(self, shard: str, batch: _Batch) -> None:
        if self._pending.get(shard) is not batch:
            return  # already sent (it filled up before its window ended)
        del self._pending[shard]
        task = asyncio.get_running_loop().create_task(self._send(shard, batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, shard: str, batch: _Batch) -> None:
        try:
            replies = await self._scripts.send(shard, batch.calls)
        except BaseException as exc:  # Redis unavailable and the like: every caller gets it
            for done in batch.futures:
                if not done.done():
                    done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for done, reply in zip(batch.futures, replies, strict=True):
            # The caller may have gone (a client disconnected): its outcome stands anyway.
            if not done.done():
                done.set_result(reply)
