"""Admission control: how many requests one API worker runs at once, adapted to their measured
latency, so that the excess of a spike is answered at once (503 ``overloaded``, Retry-After)
instead of waiting in line behind thousands of others (docs/http.md#overload).

The limit follows a latency target (``FLASHTEAM_ADMISSION_TARGET``), in the spirit of the
gradient and Vegas limits of Netflix's concurrency-limits and Envoy's adaptive concurrency:
every ``WINDOW`` the worker looks at the requests that ended in it. When more than a tenth of
them took longer than the target, the work in flight is more than Redis, SQL and this process
serve in time, so the limit shrinks by a tenth; when they were in time and requests were
refused for the limit, it grows by its square root. It stays within ``FLASHTEAM_ADMISSION_MIN``
and ``FLASHTEAM_ADMISSION_MAX``. A request is counted until its work ends, also when its
caller was answered 503 for a stalled Redis or SQL (engine/api/app.py): a stall fills the
limit, and what comes next is refused at once rather than piling up.

What money depends on goes first: a ``MONEY`` request (pay, cancel, one's own order, the
admin's calls) is admitted up to half the limit beyond it, so a payment is served while new
reservations are being refused. Health, readiness, metrics and the live page are ``EXEMPT``:
never counted, never refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import Enum

WINDOW = 0.1  # seconds between two adjustments of the limit
_SLOW_SHARE = 0.1  # more than this share of a window over the target: shrink
_SHRINK = 0.9


class Priority(Enum):
    """Which requests a worker refuses first when it is over its limit."""

    EXEMPT = 0  # health, readiness, metrics, the live page: never refused
    MONEY = 1  # pay, cancel, reads of one's own order, admin calls: refused last
    NORMAL = 2  # reservations, joins, listings, batches: refused first


class Admission:
    """One worker's limit on requests in flight (``admit`` then ``done``)."""

    def __init__(
        self,
        target: float,
        minimum: int,
        maximum: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.target = target
        self.minimum = minimum
        self.maximum = maximum
        self.limit = float(minimum)
        self.in_flight = 0
        self._clock = clock
        self._window_ends = clock() + WINDOW
        self._ended = 0
        self._slow = 0
        self._refused = False

    def admit(self, priority: Priority) -> bool:
        """Count the request in, or False (refuse it) when the worker is at its limit for
        its priority."""
        limit = self.limit if priority is Priority.NORMAL else self.limit * 1.5
        if self.in_flight >= limit:
            self._refused = True
            return False
        self.in_flight += 1
        return True

    def done(self, seconds: float) -> None:
        """A request admitted ``seconds`` ago ended; adjust the limit at each window's end."""
        self.in_flight -= 1
        self._ended += 1
        if seconds > self.target:
            self._slow += 1
        now = self._clock()
        if now >= self._window_ends:
            self._adjust()
            self._window_ends = now + WINDOW

    def _adjust(self) -> None:
        if self._slow > self._ended * _SLOW_SHARE:
            self.limit = max(float(self.minimum), self.limit * _SHRINK)
        elif self._refused:
            self.limit = min(float(self.maximum), self.limit + math.sqrt(self.limit))
        self._ended = self._slow = 0
        self._refused = False
