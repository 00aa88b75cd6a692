"""One progress line for long runs: ``make bench``'s longest benchmarks and ``make loadtest``.

On a terminal (stderr is a TTY) ``Progress`` redraws one line in place with ``\\r``: a bar,
the share done, done/total, the time so far, an estimate of the time left and a note; at most
a few times a second however often it is updated. Elsewhere (CI logs, a pipe) it prints a
plain line each time another ``every`` percent is done, so a log gets about ten lines per run.

Callers update it from a loop that already exists (one update per step, per second or per
10,000 requests, never per request); ``ticking`` updates it from a coroutine on the running
event loop twice a second, so a benchmark's request loop is not touched at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TextIO

BAR = 24  # characters of the bar


def number(value: float) -> str:
    """``1,000,000`` for whole numbers, ``2.5`` otherwise."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``."""
    whole = max(0, round(seconds))
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60:02d} s"


class Progress:
    """A progress line for ``total`` units of work (steps, requests, seconds).

    ``unit`` follows done/total (``"s"``, ``"users"``); ``every``: the percent between two
    plain lines when the stream is not a terminal; ``interval``: the least seconds between two
    redraws on a terminal; ``fresh_line``: start on a new line (pytest ``-v`` leaves the test's
    name open on the current one); ``clock``: done and total are themselves seconds (a wait,
    a timed run), so neither the time so far nor an estimate of the time left is shown;
    ``tty`` overrides what the stream says it is.
    """

    def __init__(
        self,
        label: str,
        total: float,
        *,
        unit: str = "",
        every: float = 10.0,
        interval: float = 0.25,
        stream: TextIO | None = None,
        fresh_line: bool = False,
        clock: bool = False,
        tty: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = f" {unit}" if unit else ""
        self.every = every
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = tty if tty is not None else _isatty(self.stream)
        self.started = time.monotonic()
        self.done = 0.0
        self.note = ""
        self._fresh_line = fresh_line
        self._drawn_at = float("-inf")
        self._width = 0  # of the last line drawn on a terminal
        self._reported = -1  # the last ``every``-percent step printed (not a terminal)
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def share(self) -> float:
        """How much is done, 0 to 1."""
        if self.total <= 0:
            return 1.0
        return min(1.0, max(0.0, self.done / self.total))

    def update(self, done: float, note: str | None = None) -> None:
        """``done`` units of ``total`` so far; ``note`` (kept until replaced) says what is on."""
        self.done = done
        if note is not None:
            self.note = note
        if self._closed:
            return
        if self.tty:
            now = time.monotonic()
            if now - self._drawn_at >= self.interval:
                self._drawn_at = now
                self._draw()
        else:
            reached = int(self.share * 100 // self.every) if self.every > 0 else 0
            if reached > self._reported:
                self._reported = reached
                self._print()

    def step(self, note: str | None = None) -> None:
        """One more unit done."""
        self.update(self.done + 1, note)

    def close(self, note: str | None = None) -> None:
        """End the line (a terminal's bar is drawn one last time, with its newline); a plain
        line is printed too unless the last one already said 100% and nothing new."""
        if self._closed:
            return
        self._closed = True
        fresh = note is not None and note != self.note
        if note is not None:
            self.note = note
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        elif self._reported * self.every < 100 or fresh:
            self._print()

    def line(self, bar: bool = False) -> str:
        """The progress as one line of text (with a bar of ``#`` when ``bar``)."""
        elapsed = time.monotonic() - self.started
        head = f"{self.label} [{self._bar()}]" if bar else f"{self.label}:"
        parts = [f"{head} {self.share:4.0%} {number(self.done)}/{number(self.total)}{self.unit}"]
        if not self.clock:
            parts.append(duration(elapsed))
            left = elapsed / self.share - elapsed if 0 < self.share < 1 else 0.0
            if left >= 1:
                parts.append(f"about {duration(left)} left")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def _bar(self) -> str:
        filled = round(self.share * BAR)
        return "#" * filled + "." * (BAR - filled)

    def _draw(self) -> None:
        text = self.line(bar=True)
        lead = "\n" if self._fresh_line else "\r"
        self._fresh_line = False
        self.stream.write(lead + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def _print(self) -> None:
        if self._fresh_line:
            self.stream.write("\n")
            self._fresh_line = False
        self.stream.write(self.line() + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or bare stream
        return False


@contextlib.asynccontextmanager
async def ticking(
    progress: Progress, done: Callable[[], float], every: float = 0.5
) -> AsyncIterator[Progress]:
    """Update ``progress`` with ``done()`` every ``every`` seconds while the block runs (a
    task on the running event loop), then once more and close it."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            progress.update(done())

    task = asyncio.create_task(tick())
    try:
        yield progress
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        progress.update(done())
        progress.close()
