"""The harness both hypothesis state machines share: hypothesis drives a sync machine, the
engine is async, so each example runs its own event loop and its own Engine on the session's
redis-server (flushed first), and every engine call goes through ``run``."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine

from engine import Engine
from testkit.factories import make_settings

T = TypeVar("T")

# Both machines' hypothesis settings: 25 examples of up to 30 steps, each step a real Redis
# round trip or several, hence no deadline and no too-slow health check.
SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class EngineMachine(RuleBasedStateMachine):
    """Owns one example's loop, temp dir and Engine; subclasses add the campaign and model."""

    redis_url: ClassVar[str] = ""  # set by the test from the session's redis_server
    prefix: ClassVar[str] = "sm"
    examples: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        EngineMachine.examples += 1
        self.campaign_id = f"{self.prefix}-{EngineMachine.examples}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"flashteam-{self.prefix}-"))
        self.loop = asyncio.new_event_loop()
        self.engine: Engine | None = None
        try:
            self.engine = self.run(self._open())
        except BaseException:
            self._close()
            raise

    async def prepare(self, engine: Engine) -> None:
        """Set up the example's campaign on a freshly flushed Redis (default: nothing)."""

    async def _open(self) -> Engine:
        engine = await Engine.open(make_settings(self.redis_url, self.tmp))
        try:
            await engine.runtime.redis.flushall()
            await self.prepare(engine)
        except BaseException:
            await engine.close()
            raise
        return engine

    def _close(self) -> None:
        try:
            if self.engine is not None:
                self.loop.run_until_complete(self.engine.close())
                self.engine = None
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def teardown(self) -> None:
        self._close()

    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)
