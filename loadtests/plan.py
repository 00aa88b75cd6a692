"""What a load run does, as plain functions: the load shapes' user curves, the scenario mix
and how an answer of the engine is classified.

Kept free of Locust (importing Locust monkey-patches the process with gevent), so the test
suite and the ``python -m loadtests.run`` driver can use them; ``locustfile.py`` wraps them in
``LoadTestShape`` classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: The user classes of locustfile.py by their scenario name, with their default weights.
SCENARIOS: dict[str, int] = {"flash": 6, "leader": 1, "joiner": 3, "browser": 2}


@dataclass(frozen=True, slots=True)
class Knobs:
    """The common Locust options a shape reads: peak users, spawn rate, run time (s)."""

    users: int
    spawn_rate: float
    run_time: float


#: A shape: (knobs, seconds since the start) -> (target users, spawn rate), or None to stop.
Curve = Callable[[Knobs, float], tuple[int, float] | None]


def spike(knobs: Knobs, t: float) -> tuple[int, float] | None:
    """The opening second of a sale: every user arrives at once (spawned at the spawn rate,
    which should bring all of them in within seconds), they stay for 70% of the run, then the
    crowd decays to a tenth for the rest of it."""
    if t >= knobs.run_time:
        return None
    if t < 0.7 * knobs.run_time:
        return knobs.users, knobs.spawn_rate
    return max(1, math.ceil(knobs.users / 10)), knobs.spawn_rate


STEPS = 5


def step(knobs: Knobs, t: float) -> tuple[int, float] | None:
    """A staircase to find the knee: the users grow in five equal steps, each held for a fifth
    of the run; read the knee off the throughput and latency charts of the HTML report."""
    if t >= knobs.run_time:
        return None
    k = min(STEPS - 1, int(t * STEPS / knobs.run_time))
    return max(1, math.ceil(knobs.users * (k + 1) / STEPS)), knobs.spawn_rate


def soak(knobs: Knobs, t: float) -> tuple[int, float] | None:
    """A steady soak: ramp up at the spawn rate, then hold every user until the run ends."""
    if t >= knobs.run_time:
        return None
    return knobs.users, knobs.spawn_rate


SHAPES: dict[str, Curve] = {"spike": spike, "step": step, "soak": soak}


def parse_mix(text: str) -> dict[str, int]:
    """``"flash=6,leader=1,joiner=3,browser=2"`` -> weights; scenarios left out weigh 0.

    Raises ValueError with a message fit for a command line on anything else.
    """
    weights = dict.fromkeys(SCENARIOS, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SCENARIOS:
            raise ValueError(
                f"bad scenario mix entry {part!r}: use NAME=WEIGHT with NAME one of "
                + ", ".join(SCENARIOS)
            )
        try:
            weight = int(value)
        except ValueError:
            raise ValueError(f"bad weight in {part!r}: a whole number 0 or more") from None
        if weight < 0:
            raise ValueError(f"bad weight in {part!r}: a whole number 0 or more")
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError(f"scenario mix {text!r} gives every scenario weight 0")
    return weights


def format_mix(weights: dict[str, int]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights.items())


DEFAULT_MIX = format_mix(SCENARIOS)


#: 409 and 429 codes the engine answers by design under load: expected business outcomes.
BUSINESS = frozenset(
    {
        "not_started",
        "ended",
        "invalidated",
        "sold_out",
        "limit_exceeded",
        "rate_limited",
        "hold_expired",
        "team_full",
        "team_closed",
        "already_in_team",
        "team_in_progress",
    }
)

#: Outcome categories, in report order. Only "server_error" and "unexpected" fail a run;
#: "shed" (503 overloaded: admission control refused the request at once, docs/http.md#overload)
#: and "transport" (timeouts, refused connections) are capacity findings, not correctness ones.
CATEGORIES = ("ok", "business", "unexpected", "server_error", "shed", "transport")


def classify(status: int, code: str, also: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(category, detail) of one HTTP answer: ``status`` 0 when none came, ``code`` the
    engine's error code (or ""); ``also`` more codes that are expected for this request."""
    if 200 <= status < 300:
        return "ok", str(status)
    if status == 0:
        return "transport", code or "no answer"
    if status in (409, 429) and (code in BUSINESS or code in also):
        return "business", code
    if status == 503 and code == "overloaded":
        return "shed", code
    detail = f"{status} {code}".strip()
    return ("server_error" if status >= 500 else "unexpected"), detail


def outcome_key(request: str, category: str, detail: str) -> str:
    """How one outcome is tallied: ``"<request>|<category>|<detail>"``."""
    return f"{request}|{category}|{detail}"
