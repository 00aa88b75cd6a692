"""Archival: a finished campaign leaves Redis, SQL keeps it, so Redis memory stays flat
however many sales run (docs/lifecycle.md#the-life-of-a-campaigns-data).

A campaign is archived once it is over (ended or invalidated), every hold and team has
reached its end, its outbox is flushed, Redis and SQL agree record by record (the
comparison of `flashteam reconcile`) and on every stock bucket, and ``archive_after``
seconds have passed since its end and since its last durable change. The steps, each one
safe to run again, so a pass that dies anywhere is finished by the next one:

1. seal (``archive_campaign.lua``): from now on no script changes the campaign in Redis
   (they answer ``archiving``; reads go on), so the comparison that follows stays true;
2. compare Redis with SQL; any difference unseals the campaign, which stays in Redis: the
   reason is logged and counted (``flashteam_archive_refusals_total``);
3. note the campaign in ``ft:archiving`` (the next pass resumes what is there), then commit
   its archive record to SQL (when each item sold out, the rejection counters): from that
   commit on SQL is the campaign's only copy, and every read and write of it goes there;
4. drop it from ``ft:campaigns`` and ``ft:streams`` (the reaper and the flush worker stop
   looking at it), then UNLINK its keys, one key per command (UNLINK frees a large value
   in a background thread, so no command holds Redis for long), the definition last;
5. remove it from ``ft:archiving``.

One process archives at a time (a lock in Redis, ``ft:archiver``): the reaper every
``archive_interval`` seconds, or `flashteam archive <campaign>` by hand.

A sharded campaign (engine/shards.py) is archived whole: any stock transfer left pending is
finished first, then every stock bucket is sealed (a bucket that refuses unseals the others),
its records are read from every bucket, its stock buckets summed over them, and every
bucket's keys deleted, the campaign's own definition last.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from redis.asyncio.lock import Lock

from engine.errors import Archived, EngineError, NotFound, Recovering
from engine.keys import CAMPAIGN_SET, STREAM_SET, keys_of
from engine.models import Campaign, CampaignKind, ItemStock, to_ms
from engine.reconcile import reconcile
from engine.runtime import Runtime
from engine.scripts import Code, Refusal, guarded
from engine.shards import Layout, finish_pending, sold_out_moments
from engine.store import Archive, Totals

log = logging.getLogger(__name__)

ARCHIVING = "ft:archiving"  # set: campaigns whose archival committed to SQL, keys not all gone
ARCHIVE_STATS = "ft:archive"  # hash: archived, and refusals per reason, for /metrics
_LOCK = "ft:archiver"
# A seal refused for these reasons comes after a repair (lib/common.lua untrusted).
_REPAIRED_FIRST = frozenset({"fenced", "restarted"})
_LOCK_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Archival:
    """What one archival attempt of a campaign did: ``archived`` or the reason it did not."""

    campaign_id: str
    archived: bool
    reason: str = ""  # why not: live, holds, teams, unflushed, missing, differs, ...
    differences: tuple[str, ...] = ()  # the comparison's, when it did not compare clean
    keys: int = 0  # keys deleted
    longest_ms: float = 0.0  # the slowest delete command, round trip
    seconds: float = 0.0


@dataclass(slots=True)
class Pass:
    """One archival pass over every due campaign."""

    archived: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # campaign -> reason
    skipped: bool = False  # another process holds the archiver's lock


def durable_stock(
    campaign: Campaign, totals: Iterable[Totals], sold_out: dict[str, int]
) -> tuple[ItemStock, ...]:
    """The stock buckets of every item from SQL's orders, as Redis keeps them while the
    campaign is live: held and paid units, units refunded without restock (gone), the rest
    available; ``sold_out``: when each item first sold out (ms)."""
    units: Counter[tuple[str, str]] = Counter()
    for t in totals:
        units[(t.sku, t.state)] += t.units
        units[(t.sku, "gone")] += t.kept
    stock = []
    for item in campaign.items:
        held, paid, gone = (units[(item.sku, s)] for s in ("held", "paid", "gone"))
        stock.append(ItemStock.counted(item, held, paid, gone, sold_out.get(item.sku)))
    return tuple(stock)


async def archived_refusal(
    rt: Runtime, campaign_id: str, op: str, team_id: str | None = None
) -> EngineError:
    """What an order-creating script answers once its campaign is over, for an archived one
    (where no script runs): ``op`` is reserve, open, quick or join (lib/ops.lua
    campaign_closed, then for a join the team's state). Invalidated, ended, wrong_kind,
    not_found or team_closed. A retry of a request made before the archival answers the same,
    not with its original order (that is in the shopper's order list)."""
    campaign = await rt.store.get_campaign(campaign_id)
    if campaign is None:
        return Refusal(Code.NOT_FOUND, None).error()
    if campaign.invalidated_at is not None:
        return Refusal(Code.INVALIDATED, None).error()
    ended = Refusal(Code.ENDED, str(to_ms(campaign.ends_at))).error()
    if op in ("reserve", "open"):
        return ended  # an opening op: the end comes before the campaign's kind
    if campaign.kind is not CampaignKind.TEAM:  # join and quick-join are team ops
        return Refusal(Code.WRONG_KIND, None).error()
    if op == "quick":
        return ended  # no team is joinable, and none may be opened
    team = None if team_id is None else await rt.store.get_team(team_id)
    if team is None:
        return Refusal(Code.NOT_FOUND, None).error()
    return Refusal(Code.TEAM_CLOSED, team.state.value).error()


class Archiver:
    """Moves finished campaigns out of Redis (module docstring)."""

    def __init__(self, rt: Runtime, repair: Callable[[str], Awaitable[object]]) -> None:
        """``repair``: rebuilds a campaign that awaits a repair (engine.recovery), so a
        campaign verified on no server since Redis restarted can be sealed."""
        self._rt = rt
        self._repair = repair

    async def run_once(self) -> Pass:
        """One pass: finish the archivals a dead pass left in ``ft:archiving``, then archive
        every campaign due (``Store.archive_candidates``). Nothing when another process is
        archiving (its lock)."""
        result = Pass()
        lock = self._lock()
        if not await guarded(lock.acquire(blocking=False)):
            result.skipped = True
            return result
        try:
            resumed: set[str] = await guarded(self._rt.redis.smembers(ARCHIVING))
            before = await self._rt.now() - timedelta(seconds=self._rt.settings.archive_after)
            due = await self._rt.store.archive_candidates(before)
            for campaign_id in [*sorted(resumed), *(c for c in due if c not in resumed)]:
                await guarded(lock.extend(_LOCK_SECONDS, replace_ttl=True))
                done = await self._archive(campaign_id)
                if done.archived:
                    result.archived.append(campaign_id)
                else:
                    result.refused[campaign_id] = done.reason
        finally:
            with contextlib.suppress(EngineError):
                await guarded(lock.release())
        return result

    async def archive(self, campaign_id: str, *, wait: float = 0.0) -> Archival:
        """Archive one campaign now if it can be (`flashteam archive`), whatever its grace
        period; waits up to ``wait`` seconds for another process's pass to end."""
        if await self._rt.store.get_campaign(campaign_id) is None:
            raise NotFound(f"no campaign {campaign_id}", id=campaign_id)
        lock = self._lock()
        if not await guarded(lock.acquire(blocking=wait > 0, blocking_timeout=wait or None)):
            return Archival(campaign_id, False, "busy")
        try:
            return await self._archive(campaign_id)
        finally:
            with contextlib.suppress(EngineError):
                await guarded(lock.release())

    def _lock(self) -> Lock:
        return Lock(self._rt.redis, _LOCK, timeout=_LOCK_SECONDS)

    async def _archive(self, campaign_id: str) -> Archival:
        started = time.perf_counter()
        rt = self._rt
        if await rt.store.archive_of(campaign_id) is None:
            reason, differences = await self._seal_and_compare(campaign_id)
            if reason:
                log.warning("campaign %s not archived: %s", campaign_id, reason)
                for line in differences[:20]:
                    log.warning("  %s", line)
                await _count(rt, f"refused:{reason}")
                return Archival(campaign_id, False, reason, tuple(differences))
            await guarded(rt.redis.sadd(ARCHIVING, campaign_id))
            await rt.store.archive(await self._record(campaign_id))
            log.debug("campaign %s: recorded as archived in SQL", campaign_id)
            await _count(rt, "archived")
        keys, longest = await self._delete(campaign_id)
        await guarded(rt.redis.srem(ARCHIVING, campaign_id))
        seconds = time.perf_counter() - started
        log.info(
            "campaign %s archived: %d Redis keys deleted in %.2f s (longest command %.1f ms)",
            campaign_id,
            keys,
            seconds,
            longest,
        )
        return Archival(campaign_id, True, keys=keys, longest_ms=longest, seconds=seconds)

    async def _seal_and_compare(self, campaign_id: str) -> tuple[str, list[str]]:
        """Seal the campaign and compare it with SQL: ('', []) when it may be archived, else
        the reason (the campaign then left unsealed) and the differences found."""
        rt = self._rt
        layout = await rt.layout(campaign_id)
        with contextlib.suppress(Recovering, Archived):  # the seal says why, if it must
            await finish_pending(rt, layout)
        refused = await self._seal(layout)
        log.debug("campaign %s: seal: %s", campaign_id, refused or "sealed")
        if refused in _REPAIRED_FIRST:
            await self._repair(campaign_id)
            refused = await self._seal(layout)
        if refused == "missing":
            # Redis lost it (an empty node): SQL is the authority and all there is; a repair
            # would rebuild exactly what SQL holds.
            log.warning("campaign %s: not in Redis; archived from SQL alone", campaign_id)
            return "", []
        if refused is not None:
            return refused, []
        found = await reconcile(rt, campaign_id)
        differences = list(found.differences)
        if found.unflushed:
            differences.append(f"{found.unflushed} events not flushed")
        differences += await self._stock_differences(campaign_id)
        if differences:
            for shard in layout.shards:
                await rt.scripts.unseal(shard)
            return "differs", differences
        log.debug("campaign %s: Redis and SQL agree", campaign_id)
        return "", []

    async def _seal(self, layout: Layout) -> str | None:
        """Seal every stock bucket (the campaign when it has one); the first refusal (the
        buckets sealed before it unsealed again), else 'missing' if a bucket is, else None."""
        scripts = self._rt.scripts
        sealed: list[str] = []
        missing = False
        for shard in layout.shards:
            refused = await scripts.seal(shard)
            if refused == "missing":
                missing = True
            elif refused is not None:
                for done in sealed:
                    await scripts.unseal(done)
                return refused
            else:
                sealed.append(shard)
        return "missing" if missing else None

    async def _stock_differences(self, campaign_id: str) -> list[str]:
        """Redis's stock buckets (summed over a sharded campaign's: no transfer is pending
        once it is sealed) against those SQL's orders make (``durable_stock``)."""
        rt = self._rt
        campaign = await rt.store.get_campaign(campaign_id)
        assert campaign is not None  # archive() and the candidates come from SQL
        inv: dict[str, int] = {}
        for shard in campaign.shard_ids:
            shard_inv: dict[str, str] = await guarded(rt.redis.hgetall(keys_of(shard).inv))
            for name, value in shard_inv.items():
                if name[:2] in ("i:", "a:", "h:", "p:", "r:"):
                    inv[name] = inv.get(name, 0) + int(value)
        found = []
        for item in durable_stock(campaign, await rt.store.order_totals(campaign_id), {}):
            for bucket, key in (
                ("initial", "i"),
                ("available", "a"),
                ("held", "h"),
                ("paid", "p"),
                ("gone", "r"),
            ):
                redis_value = int(inv.get(f"{key}:{item.sku}", -1))
                sql_value = getattr(item, bucket)
                if redis_value != sql_value:
                    found.append(f"stock {item.sku} {bucket}: redis {redis_value} sql {sql_value}")
        return found

    async def _record(self, campaign_id: str) -> Archive:
        """The archive record: what the campaign's reads need that only Redis has."""
        rt = self._rt
        keys = keys_of(campaign_id)
        shards = (await rt.layout(campaign_id)).shards
        invs: list[dict[str, str]] = [
            await guarded(rt.redis.hgetall(keys_of(shard).inv)) for shard in shards
        ]
        rejections: dict[str, str] = await guarded(rt.redis.hgetall(keys.rejections))
        return Archive(
            campaign_id,
            await rt.now(),
            sold_out_moments(invs),
            {code: int(n) for code, n in rejections.items()},
        )

    async def _delete(self, campaign_id: str) -> tuple[int, float]:
        """Unregister the campaign, then UNLINK its keys one at a time, the definition last:
        (keys deleted, the slowest command in ms)."""
        redis = self._rt.redis
        keys = keys_of(campaign_id)
        shards = (await self._rt.layout(campaign_id)).shards
        await guarded(redis.srem(CAMPAIGN_SET, campaign_id))
        await guarded(redis.srem(STREAM_SET, campaign_id))
        log.debug("campaign %s: unregistered", campaign_id)
        doomed = []
        for shard in (*shards[1:], campaign_id):  # a sharded campaign's buckets, then its own
            bucket = keys_of(shard)
            others = [bucket.rejections, bucket.repair, *bucket.rate_windows]
            if len(shards) > 1:
                others += [bucket.transfers, bucket.credits]
            doomed += [k for k in (*bucket.order_keys, *others) if k != keys.meta]
        deleted, longest = 0, 0.0
        for key in [*doomed, keys.meta]:
            sent = time.perf_counter()
            deleted += int(await guarded(redis.unlink(key)))
            longest = max(longest, (time.perf_counter() - sent) * 1000)
            log.debug("campaign %s: unlinked %s", campaign_id, key)
        return deleted, longest


async def _count(rt: Runtime, what: str) -> None:
    with contextlib.suppress(EngineError):
        await guarded(rt.redis.hincrby(ARCHIVE_STATS, what, 1))
