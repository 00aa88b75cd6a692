"""The reaper: ends held orders whose payment deadline passed, and fails open teams whose
expiry passed (or, with the campaign's automatic success on, makes those with enough paid
seats succeed), within 1 s, exactly once.

It polls (no keyspace notifications, docs/architecture.md#reaper): every ``reaper_interval``
seconds it runs ``expire_teams.lua`` then ``expire_orders.lua`` for each campaign in
``ft:campaigns``, in batches, until nothing is due. Several reapers may run at once: each
script removes what it ends from its index in the same atomic step, so everything is ended by
exactly one of them.
The same pass finishes the invalidation cascade (open teams fail and refund, held orders are
cancelled), so a crash in the middle of ``Campaigns.invalidate`` leaves nothing behind.

Every ``archive_interval`` seconds the reaper also runs an archival pass (engine/archive.py):
finished campaigns leave Redis for SQL.

A sharded campaign's pass runs the expiry in each of its stock buckets, and first finishes
any stock transfer between them that a process left pending (engine/shards.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from engine.errors import Archived, EngineError, Recovering, Unavailable
from engine.keys import CAMPAIGN_SET
from engine.runtime import Runtime
from engine.scripts import ExpiryStep, guarded
from engine.shards import finish_pending

log = logging.getLogger(__name__)


class Reaper:
    """Expiry of held orders across every warmed campaign."""

    def __init__(self, rt: Runtime, archive: Callable[[], Awaitable[object]] | None = None) -> None:
        """``archive``: one archival pass (engine.archive.Archiver.run_once), run every
        ``archive_interval`` seconds by ``run``."""
        self._rt = rt
        self._archive = archive

    async def expire_campaign(self, campaign_id: str) -> tuple[int, bool]:
        """End every due team (failed, or succeeded automatically), then every due held order
        of one campaign.

        Returns (teams ended + orders ended, the campaign is over and can hold nothing more).
        """
        scripts = self._rt.scripts
        layout = await self._rt.layout(campaign_id)
        await finish_pending(self._rt, layout)  # a sharded campaign's transfers in transit
        teams, _ = await self._drain(scripts.expire_teams, campaign_id)
        ended, over = teams, True
        for shard in layout.shards:
            orders, last = await self._drain(scripts.expire_orders, shard)
            ended, over = ended + orders, over and last.over
        return ended, over

    async def _drain(
        self, step: Callable[[str, int], Awaitable[ExpiryStep]], shard: str
    ) -> tuple[int, ExpiryStep]:
        """Run one expiry script until nothing more is due at once in the campaign (or stock
        bucket): (total ended, last step)."""
        batch = self._rt.settings.reaper_batch
        total = 0
        while True:
            done = await step(shard, batch)
            total += done.ended
            if not done.more_due:
                return total, done

    async def run_once(self) -> int:
        """One pass over every campaign; forgets campaigns that can hold nothing any more."""
        campaign_ids: set[str] = await guarded(self._rt.redis.smembers(CAMPAIGN_SET))
        total = 0
        for campaign_id in campaign_ids:
            try:
                ended, over = await self.expire_campaign(campaign_id)
            except Recovering:  # being repaired (engine/recovery.py): next pass
                continue
            except Archived:  # archived, or being archived: nothing live left
                await guarded(self._rt.redis.srem(CAMPAIGN_SET, campaign_id))
                continue
            total += ended
            if over:
                await guarded(self._rt.redis.srem(CAMPAIGN_SET, campaign_id))
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop`` is set; a Redis outage is logged and waited out."""
        settings = self._rt.settings
        loop = asyncio.get_running_loop()
        archived_at = loop.time()  # the first archival pass comes one interval after start
        while not stop.is_set():
            try:
                ended = await self.run_once()
                if ended:
                    log.info("reaper ended %d held orders and teams", ended)
            except Unavailable as exc:
                log.warning("reaper waiting for Redis: %s", exc)
            interval = settings.archive_interval
            if self._archive is not None and interval and loop.time() - archived_at >= interval:
                archived_at = loop.time()
                try:
                    await self._archive()
                except EngineError as exc:
                    log.warning("archival pass failed (the next one retries): %s", exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.reaper_interval)
