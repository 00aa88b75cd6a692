"""What every local server process needs: a free loopback port, and to die with its parent."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket

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
