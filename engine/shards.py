"""Sharded flash campaigns: one hot item's stock in buckets on several Redis Cluster masters.

Every key of an unsharded campaign carries one hash tag, so the campaign lives on one slot and
one Redis core (docs/performance.md, target T1). A flash campaign created with ``shards: N``
keeps its hot state in N *stock buckets*, each a whole key space of the campaign under its own
hash tag (docs/keys.md): bucket 0 is ``{c:<id>}``, exactly the unsharded layout, bucket ``k``
is ``{c:<id>:<k>}``. ``place`` picks the bucket numbers at creation so the N slots land on
different masters (evenly when N exceeds the masters); the numbers are part of the campaign's
durable definition (SQL), so every process derives the same keys. A bucket is named by its
*shard id*, ``<id>`` or ``<id>.b<k>``, and its orders are ``<shard>.o<n>``.

**Routing.** Each shopper belongs to one bucket, by a stable hash of the user id
(``Layout.shard_of_user``: CRC-32 modulo N): the per-user limit, the idempotency records, the
rate limit and the whole life of the shopper's orders stay in one script on one slot, exactly
as in an unsharded campaign. Each item's stock starts split evenly over the buckets.

**Rebalancing.** When a reservation finds its bucket without enough units while others have
some, units move between buckets through a *transfer* (lua/transfer_stock.lua), three steps
each atomic on one bucket and each safe to repeat: debit the source (its available units and
its share go down, a pending record of the transfer stays there), credit the destination
(once: it remembers every transfer it was credited), settle the source (the record goes).
``finish`` runs the last two for any pending record, so whoever sees one finishes it: the
rebalancing itself before it decides anything, the reaper on every pass, the archival before
it seals. A process killed at any step neither loses nor creates a unit: per item, the
buckets' shares plus the units of pending transfers not yet credited always equal the stock
(the audit checks it, engine/audit.py).

**Sold out.** ``Rebalancer.refill`` reads every bucket (``peek``: available units, pending
transfers, the count of credits received, atomically per bucket), finishes what is in transit,
and moves units from the richest buckets to the shopper's (as many as the shoppers waiting
for that bucket asked for, at least half of a donor's). It answers ``sold_out`` only when no
other bucket has a unit, nothing is in transit, and a second read finds no bucket credited in
between: a unit cannot then have been in flight during the first read (it would have been
credited to a bucket already read, moving its count), so at the moment between the two reads
the whole item had fewer units than asked for. The only units such an answer can miss are
those a cancellation or an expiry returns after its bucket was read, as in an unsharded
campaign (they sell again at once, or after the sold-out fast path's TTL). Transfers in flight
add nothing to that bound: none is ever counted as sold out (tests/test_shards.py measures
it). A shopper whose retries keep losing the moved units to other shoppers gives up after
``ROUNDS`` rounds with ``sold_out`` and is counted (``Rebalancer.gave_up``); no test sees one.

Team campaigns are never sharded: a team's seats, its members' orders and the joinable index
that quick-join reads must be changed in one script, on one slot.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio.cluster import RedisCluster

from engine.errors import EngineError
from engine.keys import MAX_BUCKET, keys_of, shard_id
from engine.models import Campaign, ItemStock
from engine.scripts import Peek, RedisClient, Scripts, Transfer, guarded

if TYPE_CHECKING:
    from engine.runtime import Runtime

# Rounds of reserve-then-refill one reservation of a sharded campaign tries (see the module's
# docstring); reads of every bucket one refill makes before it answers anyway.
ROUNDS = 16
SCANS = 8
# hash: transfers, units moved, pending transfers finished, reservations that gave up, added
# by every process's rebalancer as they happen (rare events), for /metrics
REBALANCE_STATS = "ft:rebalance"


def bucket_index(user_id: str, buckets: int) -> int:
    """The bucket a user's requests go to: a stable hash of the user id (the same in every
    process and Python version)."""
    return zlib.crc32(user_id.encode()) % buckets


@dataclass(frozen=True, slots=True)
class Layout:
    """A campaign's stock buckets: their shard ids, bucket 0 (the campaign id) first."""

    campaign_id: str
    shards: tuple[str, ...]

    @classmethod
    def of(cls, campaign: Campaign) -> Layout:
        return cls(campaign.id, campaign.shard_ids)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def shard_of_user(self, user_id: str) -> str:
        """The bucket (shard id) of every request of this user."""
        shards = self.shards
        return shards[0] if len(shards) == 1 else shards[bucket_index(user_id, len(shards))]


async def place(redis: RedisClient, campaign_id: str, shards: int) -> tuple[int, ...]:
    """The bucket numbers of a new campaign of ``shards`` buckets: 0 first, then the lowest
    numbers whose slots keep the buckets spread evenly over the cluster's masters (each next
    bucket on a master with the fewest so far). On a standalone Redis all buckets share the
    one server: 0 to N - 1."""
    if shards == 1:
        return ()
    if not isinstance(redis, RedisCluster):
        return tuple(range(shards))

    def master(bucket: int) -> str:
        node = redis.get_node_from_key(keys_of(shard_id(campaign_id, bucket)).meta)
        return "" if node is None else str(node.name)

    count: Counter[str] = Counter({node.name: 0 for node in redis.get_primaries()})
    count[master(0)] += 1
    chosen = [0]
    for bucket in range(1, MAX_BUCKET + 1):
        if len(chosen) == shards:
            break
        node = master(bucket)
        if count[node] == min(count.values()):
            chosen.append(bucket)
            count[node] += 1
    return tuple(chosen)


async def finish(scripts: Scripts, transfer: Transfer) -> bool:
    """Finish a pending transfer: credit its destination (once, however often this runs),
    then settle its source. True when its units are on sale at the destination, False when
    the transfer was void (debited before a repair, which counted its units)."""
    credited = await scripts.credit(transfer)
    await scripts.settle(transfer)
    return credited


async def finish_pending(rt: Runtime, layout: Layout) -> int:
    """Finish every pending transfer of the campaign (the reaper, the archival); how many."""
    if not layout.sharded:
        return 0
    finished = 0
    for shard in layout.shards:
        for transfer in (await rt.scripts.peek(shard, "")).pending:
            await finish(rt.scripts, transfer)
            finished += 1
    return finished


async def stock(rt: Runtime, campaign: Campaign) -> tuple[ItemStock, ...]:
    """The live stock of a sharded campaign's items over every bucket: held, paid and gone
    summed (they never move between buckets), available the rest of the stock (the buckets'
    available units and those in transit between them). When every bucket has sold out of an
    item, it sold out when the last one did."""
    invs: list[dict[str, str]] = [
        await guarded(rt.redis.hgetall(keys_of(shard).inv)) for shard in campaign.shard_ids
    ]
    sold_out = sold_out_moments(invs)
    items = []
    for item in campaign.items:
        sku = item.sku
        held, paid, gone = (sum(int(inv.get(f"{b}:{sku}", 0)) for inv in invs) for b in "hpr")
        items.append(ItemStock.counted(item, held, paid, gone, sold_out.get(sku)))
    return tuple(items)


def sold_out_moments(invs: list[dict[str, str]]) -> dict[str, int]:
    """Per sku, when the item sold out in every bucket (ms): the last bucket's ``out:``."""
    outs: dict[str, list[int]] = {}
    for inv in invs:
        for field, value in inv.items():
            if field.startswith("out:"):
                outs.setdefault(field[4:], []).append(int(value))
    return {sku: max(moments) for sku, moments in outs.items() if len(moments) == len(invs)}


async def outbox_entries(redis: RedisClient, shards: Sequence[str]) -> int:
    """Events in the outbox streams of a campaign's stock buckets (``shards``)."""
    return sum([int(await guarded(redis.xlen(keys_of(shard).events))) for shard in shards])


async def in_transit(rt: Runtime, layout: Layout) -> dict[str, int]:
    """Per sku, the units of pending transfers not yet credited (the audit's, on a quiet
    campaign)."""
    units: Counter[str] = Counter()
    for shard in layout.shards:
        pending: dict[str, str] = await guarded(rt.redis.hgetall(keys_of(shard).transfers))
        for xid, record in pending.items():
            transfer = Transfer.of(shard, xid, record)
            credits = keys_of(transfer.destination).credits
            if not await guarded(rt.redis.hexists(credits, xid)):
                units[transfer.sku] += transfer.units
    return dict(units)


class _Refill:
    """One refill of a bucket with an item, shared by the reservations waiting for it."""

    __slots__ = ("demand", "need", "task")

    def __init__(self) -> None:
        self.demand = 0  # units the waiting reservations asked for
        self.need = 0  # the largest of them
        self.task: asyncio.Task[int | None] | None = None


_AGAIN = -1  # a round's answer: read the buckets again


class Rebalancer:
    """Moves stock between the buckets of sharded campaigns for this process's reservations
    (module docstring); counts what it did."""

    # What it counts: transfers it debited and finished, their units (moved), pending
    # transfers of others (or of a dead process) it finished, refills that proved the item
    # sold out, second reads that found a bucket credited meanwhile (rereads), and
    # reservations answered sold_out after ROUNDS rounds (gave_up).
    EVENTS = ("transfers", "moved", "finished", "sold_out", "rereads", "gave_up")

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._refills: dict[tuple[str, str], _Refill] = {}
        self._counts: Counter[str] = Counter()  # since this process started
        self._unsaved: Counter[str] = Counter()  # not yet added to REBALANCE_STATS

    def count(self, event: str, n: int = 1) -> None:
        """Count ``n`` of ``event`` (one of EVENTS); ``save`` adds them to Redis later."""
        self._counts[event] += n
        self._unsaved[event] += n

    async def save(self) -> None:
        """Add the counts not saved yet to the counters every process shares in Redis
        (``REBALANCE_STATS``, read by /metrics); kept for the next try when Redis is away."""
        unsaved, self._unsaved = self._unsaved, Counter()
        for event, n in unsaved.items():
            try:
                await guarded(self._rt.redis.hincrby(REBALANCE_STATS, event, n))
            except EngineError:
                self._unsaved[event] += n
                raise

    @property
    def transfers(self) -> int:
        return self._counts["transfers"]

    @property
    def moved(self) -> int:
        return self._counts["moved"]

    @property
    def gave_up(self) -> int:
        return self._counts["gave_up"]

    async def refill(self, layout: Layout, sku: str, shard: str, qty: int) -> int | None:
        """Bring units of ``sku`` into bucket ``shard`` for a reservation of ``qty`` it could
        not serve: None when units were moved (or arrived): reserve again; else the item is
        sold out, with this many units left (fewer than ``qty``). Concurrent callers for one
        bucket and item share one refill, which moves units for all of them."""
        key = (shard, sku)
        refill = self._refills.get(key)
        if refill is None:
            refill = self._refills[key] = _Refill()
            refill.task = asyncio.get_running_loop().create_task(
                self._run(layout, sku, shard, refill)
            )
        refill.demand += qty
        refill.need = max(refill.need, qty)
        assert refill.task is not None
        return await asyncio.shield(refill.task)

    async def _run(self, layout: Layout, sku: str, shard: str, refill: _Refill) -> int | None:
        try:
            for _ in range(SCANS):
                left = await self._round(layout, sku, shard, refill)
                if left != _AGAIN:
                    return left
            return None  # busy buckets: let the reservations try again
        finally:
            if self._refills.get((shard, sku)) is refill:
                del self._refills[(shard, sku)]

    async def _round(self, layout: Layout, sku: str, shard: str, refill: _Refill) -> int | None:
        scripts = self._rt.scripts
        peeks = await self._peek(layout, sku)
        available = {p.shard: p.available for p in peeks}
        pending = [t for p in peeks for t in p.pending]
        for transfer in pending:  # units in transit are not sold out: deliver them
            if await finish(scripts, transfer) and transfer.sku == sku:
                available[transfer.destination] += transfer.units
            self.count("finished")
        here = available[shard]
        if here >= refill.need:
            return None  # units arrived meanwhile (or were in transit to this bucket)
        donors = sorted(
            ((units, donor) for donor, units in available.items() if donor != shard and units > 0),
            reverse=True,
        )
        if not donors:
            if not pending and await self._quiet(layout, sku, shard, refill.need, peeks):
                self.count("sold_out")
                return max(here, 0)
            return _AGAIN
        return await self._move(sku, shard, donors, max(refill.demand, refill.need) - here)

    async def _move(
        self, sku: str, shard: str, donors: list[tuple[int, str]], want: int
    ) -> int | None:
        """Move up to ``want`` units (at least half of a donor's) from the donors to ``shard``:
        None when some moved, else _AGAIN (the donors' shoppers took them first)."""
        scripts = self._rt.scripts
        moved = 0
        for units, donor in donors:
            if moved >= want:
                break
            most = max(want - moved, (units + 1) // 2)
            debited = await scripts.debit(donor, sku, most, 1, shard)
            if debited is not None and await finish(scripts, debited):
                self.count("transfers")
                self.count("moved", debited.units)
                moved += debited.units
        return None if moved else _AGAIN

    async def _peek(self, layout: Layout, sku: str) -> list[Peek]:
        scripts = self._rt.scripts
        return list(await asyncio.gather(*(scripts.peek(s, sku) for s in layout.shards)))

    async def _quiet(
        self, layout: Layout, sku: str, shard: str, need: int, first: list[Peek]
    ) -> bool:
        """Whether a second read of every bucket finds none credited since ``first``, nothing
        in transit, no unit of the item in another bucket and fewer than ``need`` in
        ``shard``: then no unit was on its way between buckets during the first read."""
        again = await self._peek(layout, sku)
        quiet = all(
            a.credits == b.credits
            and not b.pending
            and b.available < (need if b.shard == shard else 1)
            for a, b in zip(first, again, strict=True)
        )
        if not quiet:
            self.count("rereads")
        return quiet

    def stats(self) -> dict[str, int]:
        """This process's counts, for tests and benchmarks."""
        return {event: self._counts[event] for event in self.EVENTS}
