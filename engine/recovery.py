"""Repair of a campaign whose Redis state Redis lost, from the durable store (docs/faults.md).

Redis can lose acknowledged writes: replication is asynchronous, so a failover drops what the
replica had not received; a host crash loses up to a second with ``appendfsync everysec``; a
fresh node or a lost disk comes back empty. SQL is the authority. How the engine notices
before it sells:

- every script that changes a campaign first checks its ``meta`` (lib/common.lua
  ``untrusted``): no definition ('missing'), a fence ('fenced'), or a server whose
  replication id is not the one the state was verified on ('restarted': the server
  restarted, was promoted, or created its replication backlog for a replica since). It then
  answers code 18. On 'restarted' this module checks what the server holds against SQL
  (``verify``) and, when nothing SQL holds is missing, records the state as verified and the
  call is made again: attaching a replica interrupts nothing. Otherwise the caller gets
  ``Recovering`` (HTTP 503 ``unavailable``, reason ``recovering``) while this module repairs
  the campaign;
- the flush worker fences a campaign whose order or team sequence in Redis is behind SQL's
  high-water marks, or one of whose events collides with a different durable order;
- ``warm_campaign.lua`` never loads a started campaign that is missing with its initial
  stock: it answers 'missing' and the start-up repairs it instead.

The repair, one process at a time per campaign (a lock in Redis; the others wait for it):

1. fence the campaign, so nothing changes it meanwhile;
2. flush what its outbox still holds into SQL (the union of SQL and Redis: every change
   Redis made is in SQL or still in the stream, and the version-gated upsert keeps the later
   version of each order and team; an id SQL holds for another shopper keeps SQL's);
3. rebuild every Redis key of the campaign from SQL (``rebuild``): stock buckets, per-user
   units, orders with their original deadlines, teams with their seats, the joinable and
   deadline indexes, idempotency records and the order each payment reference paid, and
   sequences past every durable id plus a gap
   (``ID_GAP``) so no id a lost Redis handed out is handed out again;
4. write to SQL what the rebuild had to settle (a team whose end was lost: see ``rebuild``);
5. lift the fence, recording the server's replication id as the verified one.

Every step can run twice: a repair that dies half way leaves the fence up and the lock
expires, and the next attempt starts again from step 1.

A process repairs a campaign at most once per ``REPAIR_COOLDOWN``: a refusal that asks for
another repair sooner gets one when the cooldown ends (the campaign answers 503 recovering
meanwhile), so no caller can make repairs follow each other. Callers cannot ask for one at
will anyway: an order id is checked against its campaign before any script runs
(engine/orders.py), so only a campaign whose Redis state is missing, fenced or unverified
(what every caller of it would meet) is repaired. Each repair is counted per reason on
/metrics (``flashteam_repairs_total{why}``) and logged with its reason.

A sharded flash campaign (engine/shards.py) is repaired whole, every stock bucket together,
whichever bucket lost writes: all are fenced, every bucket's outbox is flushed, and each
bucket is rebuilt from the orders it holds in SQL (its ids, its shoppers' units and
idempotency records, its sequence past its own durable mark plus the gap), the units no order
holds split evenly over the buckets. The transfers between buckets are not in SQL and need
not be: each bucket's share of the stock is a placement, and the rebuild places afresh. So
every pending transfer and credit record goes, and the buckets get a new ``epoch``: a
transfer debited before the repair and credited after it is refused as void
(lua/transfer_stock.lua), since the rebuild counted its units already. Each bucket is
locked with the repair's token while it is rebuilt, and lifted once all are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster

from engine.errors import Archived, EngineError, NotFound
from engine.keys import CAMPAIGN_SET, STREAM_SET, keys_of, shard_of_order
from engine.models import (
    AUTO_SUCCESS,
    Campaign,
    Order,
    OrderState,
    Seat,
    Team,
    TeamState,
    from_ms,
    to_ms,
)
from engine.runtime import Runtime
from engine.scripts import guarded
from engine.store import Batch, StoredOrder, sequence
from engine.worker import FlushWorker

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Ids skipped past the highest known one after a repair: ids a lost Redis handed out but SQL
# never saw (holds acknowledged less than a flush before the loss) are never reused. A
# second of sales at the engine's peak is far fewer.
ID_GAP = 1_000_000
# The repair lock's lifetime; a live repair extends it between write chunks.
LOCK_MS = 15_000
# How far back a verification of a new server compares orders and teams with SQL: far more
# than asynchronous replication or an fsync policy loses.
VERIFY_WINDOW_MS = 600_000
# How long a call refused on a new server waits for the verification before it answers
# recovering (the verification carries on).
VERIFY_WAIT = 2.0
_CHUNK = 1_000  # hash fields or sorted-set members per command
_WAIT = 0.05
# Seconds between two repairs of one campaign by one process.
REPAIR_COOLDOWN = 10.0
# Why a campaign is repaired (flashteam_repairs_total{why}): what lib/common.lua untrusted
# answered, what the flush worker and the payment ledger found, the archival of a campaign
# Redis lost, `flashteam recover`.
REPAIR_REASONS = ("missing", "fenced", "restarted", "behind", "collision", "archival", "manual")
# Global counters of every process's repairs, read by /metrics (engine/api/metrics.py).
RECOVERY_STATS = "ft:recovery"


@dataclass(slots=True)
class RedisState:
    """Every Redis key of one campaign as a repair writes it."""

    meta: dict[str, str]
    inv: dict[str, str]
    orders: dict[str, str]
    users: dict[str, str]
    deadlines: dict[str, int]
    teams: dict[str, str]
    joinable: list[str]
    team_deadlines: dict[str, int]
    idem: dict[str, str]
    settled: Batch = field(default_factory=Batch)  # changes SQL must take too (step 4)


@dataclass(frozen=True, slots=True)
class Repair:
    """What one repair did."""

    campaign_id: str
    orders: int
    teams: int
    settled: int  # orders and teams whose lost end the repair settled
    flushed: int  # outbox entries flushed first
    seconds: float
    waited: bool = False  # another process repaired it; this one waited


class Recovery:
    """Detects, fences and repairs campaigns for one engine process."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._tasks: dict[str, asyncio.Task[Repair | None]] = {}
        self._last: dict[str, float] = {}  # campaign -> time.monotonic() of its last repair
        self._verifying: dict[str, asyncio.Task[bool]] = {}
        self._archived: set[str] = set()  # campaigns found archived (their scripts refuse)
        self.repairs = 0  # completed by this process

    async def on_untrusted(self, campaign_id: str, why: str) -> bool:
        """A script refused ``campaign_id`` (Scripts.untrusted). On a new server
        ('restarted'): verify what it holds (``verify``, at most ``VERIFY_WAIT``) and answer
        True when it holds everything SQL knows, so the script is called again. Otherwise
        start its repair in the background, unless SQL has no such campaign either
        (NotFound), or it is archived or being archived (Archived: SQL holds it,
        engine/archive.py)."""
        if why == "archiving" or campaign_id in self._archived:
            raise Archived(campaign_id)
        if why == "missing":
            if await self._rt.store.get_campaign(campaign_id) is None:
                raise NotFound(f"no campaign {campaign_id}", id=campaign_id)
            if await self._rt.store.archive_of(campaign_id) is not None:
                self._archived.add(campaign_id)  # for good: archival is never undone
                raise Archived(campaign_id)
        if why == "restarted":
            task = self._verifying.get(campaign_id)
            if task is None or task.done():
                task = asyncio.create_task(self._verify_or_repair(campaign_id))
                self._verifying[campaign_id] = task
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(task), VERIFY_WAIT)
            return False
        self.request(campaign_id, why)
        return False

    async def _verify_or_repair(self, campaign_id: str) -> bool:
        try:
            if await self.verify(campaign_id):
                return True
        except EngineError as exc:  # Redis or SQL away: the next refused call asks again
            log.error("campaign %s: verification failed: %s", campaign_id, exc.message)
            return False
        self.request(campaign_id, "lost")
        return False

    async def verify(self, campaign_id: str) -> bool:
        """Judge the campaign's state on a server it was not verified on (a replica attached
        or re-attached, a backlog re-created, a restart, a promotion) by what the server
        holds, one process at a time (the repair lock; the others wait for it): its order
        and team sequences are not behind SQL's high-water marks, and every order and team
        SQL changed in the last ``VERIFY_WINDOW_MS`` is there at SQL's version or later.
        Then the state is recorded as verified on this server, its sequences moved on by
        ``ID_GAP`` (ids a lost write may have handed out are never reused), and True: nothing
        is fenced, nothing rebuilt. False when Redis lost something SQL has: the campaign is
        fenced for a repair (or one is due already)."""
        rt = self._rt
        shards = (await rt.layout(campaign_id)).shards
        token = uuid.uuid4().hex
        while (await rt.scripts.take_repair(campaign_id, token, LOCK_MS)) is not None:
            await asyncio.sleep(_WAIT)
            if await self.trusted(campaign_id):
                return True
        lifted: list[str] = []
        try:
            since = from_ms(to_ms(await rt.now()) - VERIFY_WINDOW_MS)
            recent = await rt.store.recent_versions(campaign_id, since)
            for shard in (*shards[1:], campaign_id):  # the campaign's own bucket (lock) last
                meta = keys_of(shard).meta
                kind, fence, node = await guarded(rt.redis.hmget(meta, "kind", "fence", "node"))
                if kind is None or fence is not None:
                    return False  # missing or fenced: its scripts ask for the repair
                if node == await self.node_id(shard):
                    continue
                lost = await self._lost(shard, recent)
                if lost:
                    log.error(
                        "campaign %s: the Redis server lost writes SQL holds (%s): fencing it "
                        "for a repair",
                        shard,
                        lost,
                    )
                    await rt.scripts.fence(shard, "lost")
                    return False
                if shard != campaign_id:  # a bucket of a sharded campaign: its own lock too
                    await self._hold(shard, token)
                    lifted.append(shard)
                if not await rt.scripts.lift(shard, token, ID_GAP):
                    raise EngineError(f"campaign {shard}: the lock expired mid-verification")
                log.warning(
                    "campaign %s: verified on a new Redis server against SQL: nothing lost",
                    shard,
                )
                await _count(rt, "verified")
        finally:
            for shard in (*lifted, campaign_id):
                await rt.scripts.free(shard, token)  # what a lift did not free already
        return True

    async def _lost(self, shard: str, recent: dict[str, int]) -> str | None:
        """What the server lost of the campaign's (or stock bucket's) writes SQL holds, None
        when nothing: its sequences behind SQL's high-water marks, or an order or team of
        ``recent`` (id: SQL's version) missing or at an older version."""
        rt = self._rt
        keys = keys_of(shard)
        oseq, tseq = await guarded(rt.redis.hmget(keys.meta, "oseq", "tseq"))
        marks = await rt.store.marks(shard)
        if int(oseq or 0) < marks[0] or int(tseq or 0) < marks[1]:
            return f"order/team sequence {oseq}/{tseq} behind SQL's {marks[0]}/{marks[1]}"
        mine = [i for i in recent if i[: i.rindex(".")] == shard]
        for kind, key, decode in (
            ("o", keys.orders, Order.from_record),
            ("t", keys.teams, Team.from_record),
        ):
            ids = [i for i in mine if i[i.rindex(".") + 1] == kind]
            for chunk in _chunks(ids):
                records = await guarded(rt.redis.hmget(key, chunk))
                for item, record in zip(chunk, records, strict=True):
                    if record is None or decode(item, record).version < recent[item]:
                        return f"{item} at version {recent[item]} in SQL"
        return None

    async def check(self, campaigns: Iterable[Campaign]) -> None:
        """At start-up: fence and repair every campaign whose order or team sequence in
        Redis is behind SQL's high-water marks (Redis lost ids SQL has committed)."""
        for campaign in campaigns:
            for shard in campaign.shard_ids:  # each stock bucket of a sharded campaign
                marks = await self._rt.store.marks(shard)
                if marks == (0, 0):
                    continue
                meta = keys_of(shard).meta
                oseq, tseq = await guarded(self._rt.redis.hmget(meta, "oseq", "tseq"))
                if int(oseq or 0) < marks[0] or int(tseq or 0) < marks[1]:
                    log.error(
                        "campaign %s: Redis's order/team sequence %s/%s is behind SQL's %d/%d",
                        shard,
                        oseq,
                        tseq,
                        *marks,
                    )
                    await self._rt.scripts.fence(shard, "behind")
                    self.request(campaign.id, "behind")

    def request(self, campaign_id: str, why: str) -> None:
        """Repair the campaign in the background (once at a time in this process, and not
        sooner than REPAIR_COOLDOWN after its last repair here)."""
        task = self._tasks.get(campaign_id)
        if task is not None and not task.done():
            return
        last = self._last.get(campaign_id, -math.inf)
        wait = last + REPAIR_COOLDOWN - time.monotonic()
        log.warning(
            "campaign %s: Redis state untrusted (%s): repairing from SQL%s",
            campaign_id,
            why,
            f" in {wait:.1f} s (repaired moments ago)" if wait > 0 else "",
        )
        self._tasks[campaign_id] = asyncio.create_task(self._background(campaign_id, why, wait))

    async def _background(self, campaign_id: str, why: str, wait: float) -> Repair | None:
        try:
            if wait > 0:
                await asyncio.sleep(wait)
            return await self.repair(campaign_id, why, unless_trusted=True)
        except EngineError as exc:  # Redis or SQL away: the next refused call asks again
            log.error("campaign %s: repair failed: %s", campaign_id, exc.message)
            await _count(self._rt, "failures")
            return None

    async def wait_idle(self) -> None:
        """Wait for this process's background repairs (tests, shutdown)."""
        while tasks := [t for t in self._background_tasks() if not t.done()]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel the background repairs (the lock expires; another process redoes them)."""
        tasks = self._background_tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _background_tasks(self) -> list[asyncio.Task[Any]]:
        return [*self._tasks.values(), *self._verifying.values()]

    async def repair(self, campaign_id: str, why: str, *, unless_trusted: bool = False) -> Repair:
        """Repair one campaign now (``flashteam recover``; ``why``: the reason counted and
        logged); when another process is already repairing it, wait for that repair instead.
        ``unless_trusted``: nothing done (as if it waited) when the campaign is trusted by
        the time the lock is taken (another process repaired or verified it since this one
        was asked)."""
        rt = self._rt
        campaign = await rt.store.get_campaign(campaign_id)
        if campaign is None:
            raise NotFound(f"no campaign {campaign_id}", id=campaign_id)
        if await rt.store.archive_of(campaign_id) is not None:
            raise Archived(campaign_id)  # SQL holds it alone: nothing in Redis to repair
        self._last[campaign_id] = time.monotonic()
        started = time.perf_counter()
        token = uuid.uuid4().hex
        waited = False
        while (await rt.scripts.take_repair(campaign_id, token, LOCK_MS)) is not None:
            waited = True
            await asyncio.sleep(_WAIT)
            if await self.trusted(campaign_id):
                return Repair(campaign_id, 0, 0, 0, 0, time.perf_counter() - started, True)
        if unless_trusted and await self.trusted(campaign_id):
            await rt.scripts.free(campaign_id, token)
            return Repair(campaign_id, 0, 0, 0, 0, time.perf_counter() - started, True)
        try:
            repair = await self._repair(campaign, token, started)
        except BaseException:
            log.exception("campaign %s: repair interrupted; it stays fenced", campaign_id)
            raise
        self.repairs += 1
        await _count(rt, "repairs")
        await _count(rt, f"why:{why}")
        log.warning(
            "campaign %s repaired from SQL (%s) in %.2f s: %d orders, %d teams, %d settled, "
            "%d outbox entries flushed first%s",
            campaign_id,
            why,
            repair.seconds,
            repair.orders,
            repair.teams,
            repair.settled,
            repair.flushed,
            " (after waiting for another repair)" if waited else "",
        )
        return repair

    async def trusted(self, campaign_id: str) -> bool:
        """Whether the campaign's Redis state is verified on the current server (no fence,
        the server's replication id recorded): what every script checks; in every stock
        bucket of a sharded campaign."""
        for shard in (await self._rt.layout(campaign_id)).shards:
            meta = keys_of(shard).meta
            kind, fence, node = await guarded(self._rt.redis.hmget(meta, "kind", "fence", "node"))
            if kind is None or fence is not None or node != await self.node_id(shard):
                return False
        return True

    async def node_id(self, shard: str) -> str | None:
        """The replication id of the server holding the campaign's (or bucket's) slot."""
        redis = self._rt.redis
        meta = keys_of(shard).meta
        if isinstance(redis, RedisCluster):
            node = redis.get_node_from_key(meta)
            info = await guarded(redis.info("replication", target_nodes=node))
        else:
            info = await guarded(redis.info("replication"))
        replid = info.get("master_replid")
        return None if replid is None else str(replid)

    async def _repair(self, campaign: Campaign, token: str, started: float) -> Repair:
        rt = self._rt
        cid = campaign.id
        shards = campaign.shard_ids
        for shard in shards:
            await rt.scripts.fence(shard, "repair")
        flushed = await FlushWorker(rt, name=f"repair-{token[:8]}").drain_campaign(cid)
        metas: dict[str, dict[str, str]] = {}
        invs: dict[str, dict[str, str]] = {}
        seqs: dict[str, tuple[int, int]] = {}
        for shard in shards:
            keys = keys_of(shard)
            metas[shard] = await guarded(rt.redis.hgetall(keys.meta))
            invs[shard] = await guarded(rt.redis.hgetall(keys.inv))
            marks = await rt.store.marks(shard)
            seqs[shard] = (
                max(marks[0], int(metas[shard].get("oseq", 0))),
                max(marks[1], int(metas[shard].get("tseq", 0))),
            )
        orders = await rt.store.campaign_orders(cid)
        teams = await rt.store.campaign_teams(cid)
        now = await rt.now()
        if len(shards) == 1:
            states = {cid: rebuild(campaign, orders, teams, now, seqs[cid], invs[cid])}
        else:
            epoch = max([to_ms(now), *(int(m.get("epoch", 0)) + 1 for m in metas.values())])
            states = rebuild_shards(campaign, orders, now, seqs, invs, str(epoch))
        for shard in (*shards[1:], cid):  # the campaign's own bucket (and lock) last
            await self._write(cid, shard, token, states[shard])
        settled = states[cid].settled
        if len(settled):
            await rt.store.apply(settled)
        for shard in (*shards[1:], cid):
            if not await rt.scripts.lift(shard, token):
                raise EngineError(f"campaign {cid}: the repair lock expired mid-repair; retry")
        await guarded(rt.redis.sadd(CAMPAIGN_SET, cid))
        await guarded(rt.redis.sadd(STREAM_SET, cid))
        return Repair(
            cid,
            sum(len(state.orders) for state in states.values()),
            len(states[cid].teams),
            len(settled),
            flushed,
            time.perf_counter() - started,
        )

    async def _write(self, campaign_id: str, shard: str, token: str, state: RedisState) -> None:
        """Replace the campaign's (or one stock bucket's) keys with ``state`` in bounded
        commands, the fence up."""
        rt = self._rt
        keys = keys_of(shard)
        redis = rt.redis
        if shard != campaign_id:  # a bucket of a sharded campaign: its own lock too
            await self._hold(shard, token)
        # Every order key but the definition (kept: it carries the fence) and the outbox;
        # a sharded campaign's transfer records (the rebuild places the stock afresh).
        replaced = [k for k in keys.order_keys if k not in (keys.meta, keys.events)]
        if "epoch" in state.meta:
            replaced += [keys.transfers, keys.credits]
        for key in replaced:  # one key per command: a Cluster client takes no cross-key UNLINK
            await guarded(redis.unlink(key))
        hashes = (
            (keys.inv, state.inv),
            (keys.orders, state.orders),
            (keys.users, state.users),
            (keys.teams, state.teams),
            (keys.idem, state.idem),
        )
        for key, mapping in hashes:
            for fields in _chunks(list(mapping.items())):
                await guarded(redis.hset(key, mapping=dict[Any, Any](fields)))
                await self._hold(campaign_id, token)
                if shard != campaign_id:
                    await self._hold(shard, token)
        joinable = dict.fromkeys(state.joinable, 0)
        for key, scores in (
            (keys.deadlines, state.deadlines),
            (keys.team_expiry, state.team_deadlines),
            (keys.team_index, joinable),
        ):
            for members in _chunks(list(scores.items())):
                await guarded(redis.zadd(key, dict[Any, Any](members)))
        if state.idem:
            await guarded(redis.expire(keys.idem, rt.settings.idempotency_ttl))
        await guarded(redis.hset(keys.meta, mapping=dict[Any, Any](state.meta)))

    async def _hold(self, shard: str, token: str) -> None:
        holder = await self._rt.scripts.take_repair(shard, token, LOCK_MS)
        if holder is not None:
            raise EngineError(f"campaign {shard}: another process took over the repair")


def _chunks(items: list[_T]) -> Iterable[list[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


async def _count(rt: Runtime, what: str) -> None:
    with contextlib.suppress(EngineError):
        await guarded(rt.redis.hincrby(RECOVERY_STATS, what, 1))


def rebuild(
    campaign: Campaign,
    stored: list[StoredOrder],
    teams: list[Team],
    now: datetime,
    sequences: tuple[int, int],
    old_inv: dict[str, str],
    available: dict[str, int] | None = None,
) -> RedisState:
    """The campaign's Redis state from its durable orders and teams (a pure function).

    Orders keep their state, version and deadline (a hold past its deadline is left to the
    reaper). Teams are brought in line with their orders, which are the more recent truth
    when a team's own events were lost (a payment is committed to SQL with the pay call;
    the team's change rides the outbox): seats are the team's held and paid orders; a
    pending team whose leader paid opens (from now, when its opening time was lost); an open
    team with every seat paid succeeds; a team of orders whose team record was lost is
    rebuilt from them; held seats of a team that ended expire, and paid seats of a failed
    team are refunded with restock, as its end would have done. What changed gets a new
    version, in ``settled`` for SQL.

    ``available``: per sku, the units on sale (one stock bucket's share of those no order
    holds, ``rebuild_shards``); by default the stock no order holds.
    """
    now_ms = to_ms(now)
    orders = {s.order.order_id: s.order for s in stored}
    settled = Batch()
    known = _settle_teams(campaign, orders, teams, now, settled)
    restocked = {s.order.order_id: s.restocked for s in stored}
    restocked.update(settled.restocked)
    inv = _inventory(campaign, orders.values(), restocked, old_inv, now_ms, available)
    users: Counter[str] = Counter()
    deadlines: dict[str, int] = {}
    for order in orders.values():
        if order.state in (OrderState.HELD, OrderState.PAID):
            users[order.user_id] += order.qty
        if order.state is OrderState.HELD:
            deadlines[order.order_id] = to_ms(order.expires_at)
    idem: dict[str, str] = {}
    for s in stored:
        if s.idem:
            idem[s.idem[1:]] = f"{s.idem[0]}{sequence(s.order.order_id)}"
        if s.order.payment_ref is not None:  # the order its reference paid (pay_order.lua)
            idem[f":{s.order.payment_ref}"] = f"p{sequence(s.order.order_id)}"
    top_order = max((sequence(i) for i in orders), default=0)
    top_team = max((sequence(i) for i in known), default=0)
    meta = _meta(campaign)
    meta["oseq"] = str(max(sequences[0], top_order) + ID_GAP)
    meta["tseq"] = str(max(sequences[1], top_team) + ID_GAP)
    return RedisState(
        meta=meta,
        inv=inv,
        orders={i: o.record() for i, o in orders.items()},
        users={u: str(n) for u, n in users.items() if n},
        deadlines=deadlines,
        teams={i: t.record() for i, t in known.items()},
        joinable=[e for t in known.values() if (e := _joinable(t))],
        team_deadlines={
            i: to_ms(t.expires_at)
            for i, t in known.items()
            if t.state is TeamState.OPEN and t.expires_at is not None
        },
        idem=idem,
        settled=settled,
    )


def rebuild_shards(
    campaign: Campaign,
    stored: list[StoredOrder],
    now: datetime,
    sequences: dict[str, tuple[int, int]],
    old_invs: dict[str, dict[str, str]],
    epoch: str,
) -> dict[str, RedisState]:
    """Every stock bucket of a sharded flash campaign from its durable orders (a pure
    function): each bucket is ``rebuild`` of the orders it holds (by their ids), on sale the
    units no order of any bucket holds, split evenly (the remainder to the first buckets);
    each with the new ``epoch``."""
    shards = campaign.shard_ids
    by_shard: dict[str, list[StoredOrder]] = {shard: [] for shard in shards}
    for s in stored:
        shard = shard_of_order(s.order.order_id)
        if shard not in by_shard:
            raise EngineError(f"campaign {campaign.id}: order {s.order.order_id} of no bucket")
        by_shard[shard].append(s)
    restocked = {s.order.order_id: s.restocked for s in stored}
    used = _used((s.order for s in stored), restocked)
    free: dict[str, int] = {}
    for item in campaign.items:
        held = sum(used[b][item.sku] for b in "hpr")
        if held > item.stock:
            raise _oversold(campaign, item.sku, held, item.stock)
        free[item.sku] = item.stock - held
    states: dict[str, RedisState] = {}
    for index, shard in enumerate(shards):
        share = {
            sku: units // len(shards) + (1 if index < units % len(shards) else 0)
            for sku, units in free.items()
        }
        state = rebuild(
            campaign, by_shard[shard], [], now, sequences[shard], old_invs[shard], share
        )
        state.meta["epoch"] = epoch
        states[shard] = state
    return states


def _settle_teams(
    campaign: Campaign, orders: dict[str, Order], teams: list[Team], now: datetime, settled: Batch
) -> dict[str, Team]:
    """Every team in line with its orders (``_settle_team``), the teams SQL lost rebuilt from
    their orders; ``orders`` and ``settled`` take what changed."""
    now_ms = to_ms(now)
    by_team: dict[str, list[Order]] = defaultdict(list)
    for order in orders.values():
        if order.team_id:
            by_team[order.team_id].append(order)
    known = {t.team_id: t for t in teams}
    for team_id, members in by_team.items():
        if team_id not in known:
            known[team_id] = _lost_team(campaign, team_id, members)
    for team_id, team in list(known.items()):
        fixed, ended = _settle_team(campaign, team, by_team.get(team_id, []), now)
        for order in ended:
            orders[order.order_id] = order
            refunded = order.state is OrderState.REFUNDED
            settled.add_order(order, now_ms, restocked=True if refunded else None)
        if fixed is not team:
            known[team_id] = fixed
            settled.add_team(fixed, now_ms)
    return known


def _meta(campaign: Campaign) -> dict[str, str]:
    invalidated = campaign.invalidated_at
    return {
        "kind": campaign.kind.value,
        "starts": str(to_ms(campaign.starts_at)),
        "ends": str(to_ms(campaign.ends_at)),
        "limit": str(campaign.per_user_limit),
        "hold": str(campaign.hold_seconds * 1000),
        "team_size": str(campaign.team_size or 0),
        "team_ttl": str((campaign.team_ttl_seconds or 0) * 1000),
        "invalid": str(0 if invalidated is None else to_ms(invalidated)),
        "order_limit": str(campaign.per_order_limit or 0),
        "auto": str(campaign.auto_success_min_paid or 0),
        "min_pay": str(campaign.quick_join_min_ms),
    }


def _used(orders: Iterable[Order], restocked: dict[str, bool | None]) -> dict[str, Counter[str]]:
    """Units per sku that orders hold: held (h), paid (p), refunded without restock (r). A
    refund whose restock is unknown counts as restocked."""
    buckets: dict[str, Counter[str]] = {b: Counter() for b in "hpr"}
    for order in orders:
        if order.state is OrderState.HELD:
            buckets["h"][order.sku] += order.qty
        elif order.state is OrderState.PAID:
            buckets["p"][order.sku] += order.qty
        elif order.state is OrderState.REFUNDED and restocked.get(order.order_id) is False:
            buckets["r"][order.sku] += order.qty
    return buckets


def _oversold(campaign: Campaign, sku: str, used: int, stock: int) -> EngineError:
    return EngineError(
        f"campaign {campaign.id}: SQL holds {used} units of {sku} for a stock of "
        f"{stock}; refusing to repair (run `flashteam reconcile {campaign.id}`)"
    )


def _inventory(
    campaign: Campaign,
    orders: Iterable[Order],
    restocked: dict[str, bool | None],
    old_inv: dict[str, str],
    now_ms: int,
    on_sale: dict[str, int] | None = None,
) -> dict[str, str]:
    """The stock buckets from the orders: held, paid, refunded without restock; available is
    the rest of the initial stock (or ``on_sale``, one stock bucket's share)."""
    buckets = _used(orders, restocked)
    inv: dict[str, str] = {}
    for item in campaign.items:
        sku = item.sku
        h, p, r = (buckets[b][sku] for b in "hpr")
        available = item.stock - h - p - r if on_sale is None else on_sale[sku]
        if available < 0:
            raise _oversold(campaign, sku, h + p + r, item.stock)
        inv |= {
            f"$:{sku}": str(item.price),
            f"i:{sku}": str(available + h + p + r),
            f"a:{sku}": str(available),
            f"h:{sku}": str(h),
            f"p:{sku}": str(p),
            f"r:{sku}": str(r),
        }
        if item.leader_price is not None:
            inv[f"l:{sku}"] = str(item.leader_price)
        out = old_inv.get(f"out:{sku}")
        if out is not None or available == 0:
            inv[f"out:{sku}"] = out or str(now_ms)
    return inv


def _lost_team(campaign: Campaign, team_id: str, members: list[Order]) -> Team:
    """A team whose record SQL never received, from its orders: the first order leads it."""
    first = min(members, key=lambda o: sequence(o.order_id))
    return Team(
        team_id=team_id,
        campaign_id=campaign.id,
        leader_id=first.user_id,
        sku=first.sku,
        qty=first.qty,
        size=campaign.team_size or len(members),
        state=TeamState.PENDING,
        created_at=first.created_at,
        opened_at=None,
        expires_at=None,
        held=0,
        paid=0,
        version=0,
        why=None,
        seats=(),
    )


_LIVE = (OrderState.HELD, OrderState.PAID)
_ENDED = (TeamState.SUCCEEDED, TeamState.FAILED, TeamState.DISSOLVED)


def _settle_team(
    campaign: Campaign, team: Team, members: list[Order], now: datetime
) -> tuple[Team, list[Order]]:
    """``team`` in line with its orders; returns it (the same object when nothing changed)
    and the member orders its end settles. A team's record is kept as its scripts leave it
    (lua/lib/release.lua): a failed or dissolved team keeps its seats with none held; a team
    that succeeded automatically keeps its paid seats only. An open team whose time ran out
    with enough paid seats for the campaign's automatic success succeeds here as the reaper
    would make it (held seats released); one without is left to the reaper, which fails it."""
    live = {o.order_id: o for o in members if o.state in _LIVE}
    if team.state is TeamState.SUCCEEDED and team.why != AUTO_SUCCESS:
        return team, []  # every seat paid
    if team.state in _ENDED:
        return team, _end_seats(team.state, team.why, live.values())
    recorded = [s.order_id for s in team.seats if s.order_id in live]
    order_ids = recorded + sorted((i for i in live if i not in recorded), key=sequence)
    seats = tuple(Seat(i, live[i].user_id) for i in order_ids)
    held = sum(1 for o in live.values() if o.state is OrderState.HELD)
    paid = sum(1 for o in live.values() if o.state is OrderState.PAID)
    state: TeamState = team.state
    opened, expires, why = team.opened_at, team.expires_at, team.why
    ended: list[Order] = []
    if state is TeamState.PENDING:
        leader = next((o for o in live.values() if o.user_id == team.leader_id), None)
        if leader is None:  # the leader's hold ended: the team dissolves with it
            state, held, why = TeamState.DISSOLVED, 0, why or "leader_unpaid"
            seats = team.seats
            ended = _end_seats(state, why, live.values())
        elif leader.state is OrderState.PAID:  # the leader paid: it opened
            state = TeamState.OPEN
            opened = opened or now
            ttl_ms = (campaign.team_ttl_seconds or 0) * 1000
            expires = expires or from_ms(to_ms(opened) + ttl_ms)
    if state is TeamState.OPEN and paid >= team.size:
        state = TeamState.SUCCEEDED
    elif state is TeamState.OPEN and _auto_succeeds(campaign, expires, paid, now):
        state, held, why = TeamState.SUCCEEDED, 0, AUTO_SUCCESS
        seats = tuple(seat for seat in seats if live[seat.order_id].state is OrderState.PAID)
        ended = _end_seats(state, why, live.values())
    now_fields = (state, opened, expires, why, held, paid, seats)
    if now_fields == (
        team.state,
        team.opened_at,
        team.expires_at,
        team.why,
        team.held,
        team.paid,
        team.seats,
    ):
        return team, ended
    fixed = replace(
        team,
        state=state,
        opened_at=opened,
        expires_at=expires,
        why=why,
        held=held,
        paid=paid,
        seats=seats,
        version=team.version + 1,
    )
    return fixed, ended


def _auto_succeeds(campaign: Campaign, expires: datetime | None, paid: int, now: datetime) -> bool:
    """Whether an open team with ``paid`` seats paid, expiring at ``expires``, succeeds
    automatically now (lua/expire_teams.lua): the campaign's option is on and not
    invalidated (invalidation fails every open team), the team's time ran out, and enough
    seats are paid."""
    least = campaign.auto_success_min_paid
    return (
        least is not None
        and campaign.invalidated_at is None
        and expires is not None
        and expires <= now
        and paid >= least
    )


def _end_seats(state: TeamState, why: str | None, live: Iterable[Order]) -> list[Order]:
    """The seats an ended team still has live, ended as its end ends them: a held seat
    expires (cancelled when the campaign was invalidated), a paid seat of a failed team is
    refunded with restock; a succeeded team's paid seats stand."""
    ended: list[Order] = []
    for order in live:
        if order.state is OrderState.HELD:
            end = OrderState.CANCELLED if why == "invalidated" else OrderState.EXPIRED
            ended.append(replace(order, state=end, version=order.version + 1))
        elif state is TeamState.FAILED:
            ended.append(replace(order, state=OrderState.REFUNDED, version=order.version + 1))
    return ended


def _joinable(team: Team) -> str | None:
    """The team's joinable-index entry (lua/lib/team.lua index_entry), None when not open
    with a free seat."""
    if team.state is not TeamState.OPEN or team.remaining <= 0 or team.expires_at is None:
        return None
    return f"{team.sku}|{team.remaining:03d}|{to_ms(team.expires_at):013d}|{team.team_id}"
