"""What every part of the engine shares: settings, the Redis client, the scripts, the store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.models import from_ms
from engine.scripts import RedisClient, Scripts, guarded
from engine.settings import Settings
from engine.store import Store


@dataclass(frozen=True, slots=True)
class Runtime:
    """The engine's shared parts, built once by ``Engine.open``."""

    settings: Settings
    redis: RedisClient
    scripts: Scripts
    store: Store

    async def now(self) -> datetime:
        """The Redis server's clock: the one clock every script decides by."""
        seconds, micros = await guarded(self.redis.time())
        return from_ms(int(seconds) * 1000 + int(micros) // 1000)
