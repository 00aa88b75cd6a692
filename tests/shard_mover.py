"""The process tests/test_shard_crash.py kills: an engine that moves stock between the buckets
of a sharded campaign as fast as it can, through both ways a transfer starts: explicit
transfers between random buckets (debit, credit, settle: lua/transfer_stock.lua) and
reservations of shoppers of one bucket that make the rebalancer refill it, each cancelled at
once so the units flow on. Prints one line per step done. Run as
``python -m tests.shard_mover <campaign>`` with the engine's settings in the environment."""

from __future__ import annotations

import asyncio
import random
import sys

from engine import Engine, Settings
from engine.errors import Rejected
from engine.shards import finish


async def move(campaign_id: str) -> None:
    async with await Engine.open(Settings.from_env()) as engine:
        layout = await engine.runtime.layout(campaign_id)
        scripts = engine.runtime.scripts
        rng = random.Random()
        step = 0
        while True:
            step += 1
            if step % 4:
                source, destination = rng.sample(layout.shards, 2)
                transfer = await scripts.debit(source, "sku-1", rng.randint(1, 20), 1, destination)
                if transfer is not None:
                    await finish(scripts, transfer)
            else:
                user = f"m{rng.randrange(50)}"
                try:
                    held = await engine.flash.reserve(campaign_id, user, "sku-1", 1, f"k{step}")
                    await engine.orders.cancel(held.order.order_id, user)
                except Rejected:
                    pass
            print(step, flush=True)


if __name__ == "__main__":
    asyncio.run(move(sys.argv[1]))
