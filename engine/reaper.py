"""The reaper: ends held orders whose payment deadline passed, and fails open teams whose
expiry passed, within 1 s, exactly once.

It polls (no keyspace notifications, SPEC 4): every ``reaper_interval`` seconds it runs
``expire_teams.lua`` then ``expire_orders.lua`` for each campaign in ``ft:campaigns``, in
batches, until nothing is due. Several reapers may run at once: each script removes what it
ends from its index in the same atomic step, so everything is ended by exactly one of them.
The same pass finishes the invalidation cascade (open teams fail and refund, held orders are
cancelled), so a crash in the middle of ``Campaigns.invalidate`` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.commands.core import AsyncScript

from engine.errors import Unavailable
from engine.keys import CAMPAIGN_SET, keys_of
from engine.runtime import Runtime
from engine.scripts import guarded

log = logging.getLogger(__name__)


class Reaper:
    """Expiry of held orders across every warmed campaign."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    async def expire_campaign(self, campaign_id: str) -> tuple[int, bool]:
        """Fail every due team, then end every due held order of one campaign.

        Returns (teams failed + orders ended, the campaign is over and can hold nothing more).
        """
        scripts = self._rt.scripts
        teams, _ = await self._drain(scripts.expire_teams, campaign_id)
        orders, upcoming = await self._drain(scripts.expire_orders, campaign_id)
        return teams + orders, upcoming == -2

    async def _drain(self, script: AsyncScript, campaign_id: str) -> tuple[int, int]:
        keys = keys_of(campaign_id)
        batch = self._rt.settings.reaper_batch
        total = 0
        while True:
            ended, upcoming = await self._rt.scripts.run(script, keys.order_keys, (batch,))
            total += ended
            if int(upcoming) != 0:
                return total, int(upcoming)

    async def run_once(self) -> int:
        """One pass over every campaign; forgets campaigns that can hold nothing any more."""
        campaign_ids: set[str] = await guarded(self._rt.redis.smembers(CAMPAIGN_SET))
        total = 0
        for campaign_id in campaign_ids:
            ended, over = await self.expire_campaign(campaign_id)
            total += ended
            if over:
                await guarded(self._rt.redis.srem(CAMPAIGN_SET, campaign_id))
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop`` is set; a Redis outage is logged and waited out."""
        interval = self._rt.settings.reaper_interval
        while not stop.is_set():
            try:
                ended = await self.run_once()
                if ended:
                    log.info("reaper ended %d held orders and teams", ended)
            except Unavailable as exc:
                log.warning("reaper waiting for Redis: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
