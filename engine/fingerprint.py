"""The settings every process of one deployment must share, checked at start.

Each process reads its settings from its own environment, so two API nodes (or an API node
and a reaper) can disagree without a word: one node rate-limiting and the other not, payments
acknowledged at different moments, another token. Every process that opens the engine
compares a fingerprint of those settings with the one the last process to start published in
Redis (``ft:settings``), logs a warning naming each setting that differs, and publishes its
own. A warning, not a refusal: a rolling change of a setting passes through a moment where
both values run. Tokens are compared only when both processes have them (a flush worker
needs none) and only as digests: the secret never reaches Redis.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from typing import Any

from engine.runtime import Runtime
from engine.scripts import guarded
from engine.settings import Settings

log = logging.getLogger(__name__)

SETTINGS_KEY = "ft:settings"
# The settings that change what a request is answered, wherever it lands (docs/operations.md).
SHARED = (
    "gateway_token",
    "admin_token",
    "pay_durability",
    "rate_limit",
    "idempotency_ttl",
    "archive_after",
)
_BY, _AT = "_by", "_at"  # which process published the fingerprint, and when (ms)


def fingerprint(settings: Settings) -> dict[str, str]:
    """A digest of each shared setting this process has (unset ones left out)."""
    out: dict[str, str] = {}
    for name in SHARED:
        value = getattr(settings, name)
        if value is not None:
            out[name] = hashlib.sha256(f"{name}={value}".encode()).hexdigest()[:16]
    return out


async def check_fingerprint(rt: Runtime) -> list[str]:
    """Compare this process's shared settings with the last published ones, warn about each
    that differs, publish this process's; the variable names that differed."""
    mine = fingerprint(rt.settings)
    theirs: dict[str, str] = await guarded(rt.redis.hgetall(SETTINGS_KEY))
    differing = [
        f"FLASHTEAM_{name.upper()}"
        for name, digest in mine.items()
        if name in theirs and theirs[name] != digest
    ]
    if differing:
        log.warning(
            "%s differ from the settings of %s (started %s UTC): every API node, flush worker "
            "and reaper of one deployment must run with the same values "
            "(docs/operations.md#what-must-match)",
            ", ".join(differing),
            theirs.get(_BY, "another process"),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(theirs.get(_AT, 0)) / 1000)),
        )
    published = mine | {
        _BY: f"{socket.gethostname()}-{os.getpid()}",
        _AT: str(time.time_ns() // 1_000_000),
    }
    await guarded(rt.redis.hset(SETTINGS_KEY, mapping=dict[Any, Any](published)))
    return differing
