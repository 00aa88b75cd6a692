"""What every local server process needs: a free loopback port, to die with its parent, and
the context-manager protocol (``Server``)."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Self

_PR_SET_PDEATHSIG = 1


def free_port(*, below: int = 65536, bus_offset: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, under ``below``; with
    ``bus_offset``, port + offset must be free too (a cluster node's bus port)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port >= below:
            continue
        if bus_offset is None:
            return port
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + bus_offset))
            except OSError:
                continue
        return port


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """In the child before exec: ask Linux to send ``sig`` when its parent dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, sig)


def with_parent(preexec: Callable[[], None]) -> Callable[[], None] | None:
    """``preexec`` (a ``die_with_parent``) for a child started now, or None. Linux signals the
    child when the *thread* that started it ends, not its process: a server started from a
    worker thread (``asyncio.to_thread``, whose threads end with their event loop) would be
    stopped under its users. So only the main thread's children ask for it, on Linux."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    return preexec


class Server:
    """A local server, or a group of them, used as a context manager: entering starts it (and
    closes what a failed start left behind), leaving closes it."""

    def start(self) -> Self:
        """Start it; return it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop it (it can be started again)."""
        raise NotImplementedError

    def close(self) -> None:
        """What leaving the context does: stop (a server may also release what it keeps)."""
        self.stop()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *_: object) -> None:
        self.close()
