"""The flush worker: moves every outbox event from Redis Streams into the durable SQL store.

Each campaign's stream ``ft:{c:<id>}:events`` is read through one consumer group
(``flashteam-flush``) by any number of workers. A step, per stream:

1. skip a stream with no entry at all (XLEN: flushed entries are deleted, so an idle
   stream is empty); else read this consumer's own unacknowledged entries first (a batch
   whose SQL write failed), else claim entries idle longer than ``claim_idle`` from dead
   consumers (XAUTOCLAIM, at most every ``claim_idle`` / 2 per stream; consumers left with
   nothing pending and idle that long are then removed from the group), else read new
   entries (XREADGROUP ``>``);
2. decode them into one ``Batch`` (newest version per order and team); an entry that cannot
   be decoded goes to the dead-letter stream ``ft:dead`` with the reason;
3. write the batch in one SQL transaction (version-gated upserts: replays are harmless);
4. only then acknowledge and delete the entries (``ack_events.lua``);
5. check Redis against what SQL has committed: an event whose order or team id SQL holds for
   another shopper (a collision), or a campaign whose order or team sequence in Redis is
   behind SQL's high-water marks, means Redis lost writes: the campaign is fenced and its
   repair requested (engine/recovery.py, docs/faults.md). Idle campaigns are checked about
   once a second too.

A batch grows with the stream's backlog: it reads as many entries as the stream holds, at
least ``FLASHTEAM_FLUSH_BATCH`` and at most ``BACKLOG_GROWTH`` times it, so a worker that fell
behind (a burst, a restart) catches up in fewer, larger transactions, and a quiet stream's
batch is what little it holds.

A worker that finds nothing waits longer between passes (from 50 ms doubling up to
``_IDLE_MAX``), back to 50 ms as soon as it moves something: an idle deployment costs a few
commands a second per stream and worker, and the first entry after a quiet spell waits at
most ``_IDLE_MAX``. A worker that stops (or ``drain`` ends) leaves the group.

A sharded campaign (engine/shards.py) has one stream per stock bucket (``ft:{c:<id>:<k>}:
events``), each flushed as above, and each bucket's order sequence is checked against its own
high-water mark (SQL's ``sequences`` row of its shard id).

A crash anywhere before 4 leaves the entries pending: this or another worker reads them again
and the upserts make the second write a no-op, so every change lands exactly once in effect
(invariant I4, docs/invariants.md). Streams are found through the ``ft:streams`` set (no
KEYS scans; works on Redis Cluster, one stream per call). SQL and Redis outages, and any other
failure of a step, are waited out with backoff, nothing acknowledged: the worker never exits on
a fault, only on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass

from redis import exceptions as redis_errors

from engine.errors import EngineError, Unavailable, ValidationError
from engine.events import Event
from engine.keys import CAMPAIGN_SET, DEAD_LETTERS, STREAM_SET, keys_of
from engine.runtime import Runtime
from engine.scripts import guarded
from engine.shards import outbox_entries
from engine.store import Batch

log = logging.getLogger(__name__)

GROUP = "flashteam-flush"
_IDLE_WAIT = 0.05
_IDLE_MAX = 0.5
_NEVER = 2**62  # an idle time no consumer reaches: only the named ones go
_FORGET_EVERY = 5.0  # seconds between looks for an over campaign's streams to forget
_MAX_BACKOFF = 5.0
BACKLOG_GROWTH = 4  # a batch reads up to this many times FLASHTEAM_FLUSH_BATCH when behind

Entry = tuple[str, dict[str, str] | None]


@dataclass(frozen=True, slots=True)
class Lag:
    """How far the durable store is behind Redis."""

    streams: int  # campaign streams being watched
    unflushed: int  # entries not yet committed to SQL (read or not)
    pending: int  # of those, read by a worker and not yet acknowledged
    oldest_ms: int  # age of the oldest unflushed entry, 0 when none


class FlushWorker:
    """One consumer of the flush group; run several for throughput or availability."""

    def __init__(self, rt: Runtime, name: str | None = None) -> None:
        self._rt = rt
        self.name = name or rt.settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.flushed = 0
        self.dead_lettered = 0
        self.collisions = 0
        # Per campaign: the durable marks this worker knows (order seq, team seq) and when
        # it last compared them with Redis (event-loop seconds).
        self._durable: dict[str, tuple[int, int]] = {}
        self._checked: dict[str, float] = {}
        # Per stream (or campaign): when this worker last claimed (forgot) there.
        self._claimed: dict[str, float] = {}
        self._forgotten: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until ``stop`` is set; the batch in flight finishes first (graceful)."""
        backoff = 0.1
        idle = _IDLE_WAIT
        while not stop.is_set():
            try:
                moved = await self.step()
                backoff = 0.1
            except Exception as exc:
                if isinstance(exc, Unavailable):
                    log.warning("flush worker waiting %.1f s: %s", backoff, exc)
                else:  # not a fault of Redis or SQL: worth a traceback, not an exit
                    log.exception("flush worker step failed; retrying in %.1f s", backoff)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            if moved:
                idle = _IDLE_WAIT
            else:
                await _wait(stop, idle)
                idle = min(idle * 2, _IDLE_MAX)
        with contextlib.suppress(EngineError):
            await self.leave()

    async def leave(self) -> None:
        """Remove this consumer from the group of every stream where it holds nothing (a
        stopping worker, the end of ``drain``): no dead consumer left behind."""
        for shard in await self._shards():
            stream = keys_of(shard).events
            with contextlib.suppress(EngineError):  # no group there (yet): nothing to leave
                await self._rt.scripts.forget_consumers(stream, GROUP, _NEVER, [self.name])

    async def drain(self) -> int:
        """Flush until every stream is empty (nothing unread, nothing pending); for tests and
        `flashteam worker --drain`. Entries pending with another live consumer are claimed
        once they have been idle for ``claim_idle``."""
        total = 0
        while True:
            moved = await self.step()
            total += moved
            if not moved and (await self.lag()).unflushed == 0:
                await self.leave()
                return total
            if not moved:
                await asyncio.sleep(_IDLE_WAIT)

    async def drain_campaign(self, campaign_id: str) -> int:
        """Flush one campaign's stream (every stock bucket's) until it is empty, claiming
        entries pending with any consumer at once (a repair cannot wait ``claim_idle`` for a
        dead worker's batch; a live worker writing the same entries meanwhile is harmless:
        upserts are version-gated). Returns the entries flushed."""
        total = 0
        for shard in (await self._rt.layout(campaign_id)).shards:
            stream = keys_of(shard).events
            while True:
                moved = await self._flush(shard, claim_idle_ms=0)
                total += moved
                if not moved and not int(await guarded(self._rt.redis.xlen(stream))):
                    break
                if not moved:
                    await asyncio.sleep(_IDLE_WAIT)
            with contextlib.suppress(EngineError):  # no group there: nothing to leave
                await self._rt.scripts.forget_consumers(stream, GROUP, _NEVER, [self.name])
        return total

    async def wait_flushed(self, within: float) -> float | None:
        """Seconds until the workers flushing these streams (this one or others) have left
        nothing unflushed; None if ``within`` seconds pass first. Flushes nothing itself."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (await self.lag()).unflushed:
            if loop.time() - start > within:
                return None
            await asyncio.sleep(_IDLE_WAIT)
        return loop.time() - start

    async def step(self) -> int:
        """One pass over every stream; returns the entries committed (or dead-lettered)."""
        moved = 0
        for shard in await self._shards():
            moved += await self._flush(shard)
        return moved

    async def lag(self) -> Lag:
        """Unflushed and pending entries over every stream, and the oldest one's age."""
        redis = self._rt.redis
        shards = await self._shards()
        unflushed = pending = 0
        oldest: int | None = None
        for shard in shards:
            stream = keys_of(shard).events
            unflushed += int(await guarded(redis.xlen(stream)))
            first = await guarded(redis.xrange(stream, count=1))
            if first:
                created = int(first[0][0].split("-")[0])
                oldest = created if oldest is None else min(oldest, created)
            with contextlib.suppress(Unavailable, EngineError):
                info = await guarded(redis.xpending(stream, GROUP))
                pending += int(info["pending"])
        now_ms = int((await self._rt.now()).timestamp() * 1000)
        return Lag(len(shards), unflushed, pending, 0 if oldest is None else now_ms - oldest)

    async def _shards(self) -> list[str]:
        """Every stream's campaign, or stock bucket of a sharded campaign (its shard id)."""
        members: set[str] = await guarded(self._rt.redis.smembers(STREAM_SET))
        return [shard for cid in sorted(members) for shard in (await self._rt.layout(cid)).shards]

    async def _flush(self, shard: str, claim_idle_ms: int | None = None) -> int:
        """One batch of the stream of a campaign (or of one stock bucket: ``shard``)."""
        keys = keys_of(shard)
        stream, campaign_id = keys.events, keys.campaign_id
        entries = await self._read_group(stream, campaign_id, claim_idle_ms)
        if entries is None:
            return 0
        if not entries:
            await self._check_marks(shard, None)
            loop_now = asyncio.get_running_loop().time()
            due = loop_now - self._forgotten.get(campaign_id, 0.0) >= _FORGET_EVERY
            if shard == campaign_id and due:  # once per campaign: it looks at every bucket
                self._forgotten[campaign_id] = loop_now
                await self._maybe_forget(campaign_id)
            return 0
        batch, dead = Batch(), 0
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending: nothing left to write
                continue
            try:
                _add(batch, campaign_id, Event.decode(entry_id, fields))
            except ValidationError as exc:
                await self._dead_letter(stream, entry_id, fields, exc)
                dead += 1
        collisions = await self._rt.store.apply(batch) if len(batch) else []
        ids = [entry_id for entry_id, _ in entries]
        await self._rt.scripts.ack_events(stream, GROUP, ids)
        self.flushed += len(entries) - dead
        self.dead_lettered += dead
        if collisions:
            # SQL kept its own records (the upsert never overwrites another shopper's order);
            # the repair rebuilds Redis from them.
            self.collisions += len(collisions)
            log.error(
                "campaign %s: %d flushed ids belong to other orders or teams in SQL (%s): "
                "Redis lost writes, fencing it for a repair",
                campaign_id,
                len(collisions),
                ", ".join(collisions[:5]),
            )
            await self._rt.scripts.report_untrusted(shard, "collision")
        else:
            await self._check_marks(shard, batch)
        return len(entries)

    async def _check_marks(self, shard: str, batch: Batch | None) -> None:
        """Fence the campaign (or stock bucket) when Redis's order or team sequence is behind
        the durable marks: Redis lost ids SQL has committed. After a batch (its marks are the
        newest this worker knows), and about once a second when idle (SQL's marks, all
        workers')."""
        loop_now = asyncio.get_running_loop().time()
        known = self._durable.get(shard, (0, 0))
        if batch is not None:
            marks = batch.marks().get(shard, (0, 0))
            known = (max(known[0], marks[0]), max(known[1], marks[1]))
        elif loop_now - self._checked.get(shard, 0.0) < 1.0:
            return
        else:
            marks = await self._rt.store.marks(shard)
            known = (max(known[0], marks[0]), max(known[1], marks[1]))
        self._durable[shard] = known
        self._checked[shard] = loop_now
        if known == (0, 0):
            return
        keys = keys_of(shard)
        meta, campaign_id = keys.meta, keys.campaign_id
        kind, oseq, tseq, fence = await guarded(
            self._rt.redis.hmget(meta, "kind", "oseq", "tseq", "fence")
        )
        if kind is None or fence is not None:
            return  # missing (archived, or lost: its scripts say so), or being repaired
        if int(oseq or 0) < known[0] or int(tseq or 0) < known[1]:
            log.error(
                "campaign %s: Redis's order/team sequence %s/%s is behind SQL's %d/%d: Redis "
                "lost writes, fencing it for a repair",
                campaign_id,
                oseq,
                tseq,
                *known,
            )
            await self._rt.scripts.report_untrusted(shard, "behind")

    async def _read_group(
        self, stream: str, campaign_id: str, claim_idle_ms: int | None
    ) -> list[Entry] | None:
        """``_read``, creating the consumer group wherever Redis says it has none (NOGROUP,
        at any of the read's three commands): a new campaign's stream, or one Redis lost
        (it came back empty or from an older snapshot, or a stream emptied between two
        commands). None for a campaign no longer registered: an archived one's stream is
        gone for good. [] when the group is gone again right after its creation: the next
        pass creates it again; a worker never stops on a missing group."""
        for _ in range(2):
            try:
                return await self._read(stream, claim_idle_ms)
            except EngineError as exc:
                if "NOGROUP" not in str(exc.__cause__):
                    raise
            if not await guarded(self._rt.redis.sismember(STREAM_SET, campaign_id)):
                return None
            await self._create_group(stream)
        return []

    async def _read(self, stream: str, claim_idle_ms: int | None) -> list[Entry]:
        redis = self._rt.redis
        backlog = int(await guarded(redis.xlen(stream)))
        if not backlog:
            return []  # nothing unflushed: nothing of its own, to claim, or new
        batch = self._rt.settings.flush_batch
        count = min(max(batch, backlog), batch * BACKLOG_GROWTH)
        mine = await guarded(redis.xreadgroup(GROUP, self.name, {stream: "0"}, count=count))
        if mine and mine[0][1]:
            return list(mine[0][1])
        idle_ms = claim_idle_ms
        if idle_ms is None:
            idle_ms = int(self._rt.settings.claim_idle * 1000)
        loop_now = asyncio.get_running_loop().time()
        if claim_idle_ms is not None or loop_now - self._claimed.get(stream, 0.0) >= idle_ms / 2000:
            self._claimed[stream] = loop_now
            claimed = await guarded(
                redis.xautoclaim(stream, GROUP, self.name, idle_ms, "0-0", count)
            )
            await self._rt.scripts.forget_consumers(stream, GROUP, idle_ms)  # claimed from
            if claimed and claimed[1]:
                return list(claimed[1])
        fresh = await guarded(redis.xreadgroup(GROUP, self.name, {stream: ">"}, count=count))
        return list(fresh[0][1]) if fresh else []

    async def _create_group(self, stream: str) -> None:
        try:
            await guarded(self._rt.redis.xgroup_create(stream, GROUP, id="0", mkstream=True))
        except EngineError as exc:
            if not isinstance(exc.__cause__, redis_errors.ResponseError) or "BUSYGROUP" not in str(
                exc.__cause__
            ):
                raise

    async def _dead_letter(
        self, stream: str, entry_id: str, fields: dict[str, str], exc: ValidationError
    ) -> None:
        log.error("dead-lettering %s %s: %s", stream, entry_id, exc)
        await guarded(
            self._rt.redis.xadd(
                DEAD_LETTERS,
                {
                    "stream": stream,
                    "id": entry_id,
                    "reason": exc.message,
                    "fields": json.dumps(fields),
                },
            )
        )

    async def _maybe_forget(self, campaign_id: str) -> None:
        """Stop watching the streams of a campaign that is over (the reaper forgot it) once
        they are empty. A refund after that re-registers it; the second look catches one that
        lands in between."""
        redis = self._rt.redis
        if await guarded(redis.sismember(CAMPAIGN_SET, campaign_id)):
            return
        if await self._unflushed(campaign_id):
            return
        await guarded(redis.srem(STREAM_SET, campaign_id))
        if await self._unflushed(campaign_id):
            await guarded(redis.sadd(STREAM_SET, campaign_id))

    async def _unflushed(self, campaign_id: str) -> int:
        """Entries in the campaign's streams (every stock bucket's)."""
        return await outbox_entries(self._rt.redis, (await self._rt.layout(campaign_id)).shards)


def _add(batch: Batch, campaign_id: str, event: Event) -> None:
    if event.order is not None:
        batch.add_order(event.order, event.at_ms, idem=event.idem, restocked=event.restocked)
    elif event.team is not None:
        batch.add_team(event.team, event.at_ms)
    elif event.type == "campaign.invalidated":
        batch.invalidations[campaign_id] = event.at_ms


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
