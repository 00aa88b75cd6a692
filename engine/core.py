"""The engine: one object that the CLI, the HTTP layer, benchmarks and tests all use.

async with await Engine.open(settings) as engine:
    view = await engine.campaigns.create(campaign)
    held = await engine.flash.reserve("c1", "u1", "sku-1", 1, "key-1")
    await engine.orders.pay(held.order.order_id, "u1", "pay-1")
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from types import TracebackType

from engine.archive import Archiver
from engine.campaigns import Campaigns
from engine.coalesce import Coalescer
from engine.connection import MAX_IN_FLIGHT, check_eviction_policy, connect_redis
from engine.errors import EngineError
from engine.fingerprint import check_fingerprint
from engine.flash import FlashSale
from engine.orders import Orders
from engine.reaper import Reaper
from engine.recovery import Recovery
from engine.runtime import Runtime
from engine.scripts import OrderArgs, Scripts
from engine.settings import Settings
from engine.shards import Rebalancer
from engine.store import Store, open_store
from engine.teams import Teams

log = logging.getLogger(__name__)


class Engine:
    """Campaigns, flash sale, teams, orders and the reaper over one Redis and one durable
    store."""

    def __init__(self, rt: Runtime) -> None:
        self.runtime = rt
        self.recovery = Recovery(rt)
        rt.scripts.untrusted = self.recovery.on_untrusted
        self.archiver = Archiver(rt, repair=lambda cid: self.recovery.repair(cid, "archival"))
        self.reaper = Reaper(rt, archive=self.archiver.run_once)
        self.campaigns = Campaigns(rt, cascade=self.reaper.expire_campaign)
        self.coalescer = Coalescer(rt)
        self.rebalancer = Rebalancer(rt)
        self.flash = FlashSale(rt, self.coalescer, self.rebalancer)
        self.orders = Orders(rt)
        self.teams = Teams(rt, self.coalescer)

    @classmethod
    async def open(cls, settings: Settings, store: Store | None = None) -> Engine:
        """Connect, check Redis, load the scripts, open the store and warm the campaigns."""
        client = connect_redis(settings)
        try:
            await check_eviction_policy(client)
            scripts = Scripts(client, OrderArgs.of(settings), MAX_IN_FLIGHT)
            await scripts.load()
            store = store or await open_store(settings)
        except BaseException:
            await client.aclose()
            raise
        engine = cls(Runtime(settings, client, scripts, store))
        await check_fingerprint(engine.runtime)
        await engine.recovery.check(await engine.campaigns.warm_all())
        return engine

    async def readiness(self, within: float) -> dict[str, str]:
        """Each dependency's state, "ok" or "unavailable" (what is wrong is logged, not told
        to a caller without a token): Redis (its clock read within ``within`` seconds), the
        scripts (loaded at start; a restarted Redis gets them again at their first call), the
        store (one read by key within ``within``)."""
        rt = self.runtime

        async def check(name: str, probe: Awaitable[object]) -> str:
            try:
                await asyncio.wait_for(probe, within)
            except EngineError as exc:
                log.warning("readiness: %s is unavailable: %s", name, exc.message)
                return "unavailable"
            except TimeoutError:
                log.warning("readiness: %s did not answer within %g s", name, within)
                return "unavailable"
            return "ok"

        redis, sql = await asyncio.gather(
            check("redis", rt.now()), check("sql", rt.store.get_campaign("readyz-probe"))
        )
        scripts = "ok" if rt.scripts.loaded and redis == "ok" else "unavailable"
        return {"redis": redis, "scripts": scripts, "sql": sql}

    async def close(self) -> None:
        """Stop the background repairs, close the store and the Redis connections."""
        await self.recovery.close()
        await self.runtime.store.close()
        await self.runtime.redis.aclose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
