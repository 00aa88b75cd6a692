"""Private redis-server processes on free loopback ports, for `flashteam run` and the tests.

``RedisServer`` runs one server with AOF on and ``maxmemory-policy noeviction``;
``RedisClusterServers`` runs three such servers as a 3-master Redis Cluster.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import ConfigurationError
from engine.local.process import Server, die_with_parent, free_port
from engine.settings import DEFAULTS

_START_TIMEOUT = 15.0
_CLUSTER_BUS_OFFSET = 10_000


def redis_server_binary() -> str:
    """Path of redis-server; ConfigurationError saying how to install it when missing."""
    path = shutil.which("redis-server")
    if path is None:
        raise ConfigurationError(
            "redis-server is not installed: run `make install` (it uses apt-get when it can) or "
            "`sudo apt-get install redis-server`, or set FLASHTEAM_REDIS_URL to your Redis"
        )
    return path


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


class RedisServer(Server):
    """One redis-server child process bound to 127.0.0.1, data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendfsync: str = DEFAULTS.appendfsync,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING (loading its AOF first)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--logfile", "redis.log",
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigurationError(
                    f"redis-server exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            try:
                if _ping(self.port).startswith(b"+PONG"):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise ConfigurationError(f"redis-server on port {self.port} did not answer in time")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (AOF flushed) by default, SIGKILL when ``kill``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        process.wait(timeout=_START_TIMEOUT)


def _command(port: int, *args: str) -> str:
    """Send one inline command to a local server and return its reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        return sock.recv(4096).decode(errors="replace")


class RedisClusterServers(Server):
    """A Redis Cluster of three masters on loopback, slots split evenly, no replicas."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.servers = [
            RedisServer(
                data_dir / f"node{i}",
                port=free_port(below=65536 - _CLUSTER_BUS_OFFSET, bus_offset=_CLUSTER_BUS_OFFSET),
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self) -> RedisClusterServers:
        """Start the nodes, assign the 16384 slots, join them, and wait for ``cluster_state:ok``."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for server in self.servers:
            server.start()
        share = 16384 // len(self.servers)
        for i, server in enumerate(self.servers):
            last = 16383 if i == len(self.servers) - 1 else (i + 1) * share - 1
            _command(server.port, "CLUSTER", "ADDSLOTSRANGE", str(i * share), str(last))
        for server in self.servers[1:]:
            _command(server.port, "CLUSTER", "MEET", "127.0.0.1", str(self.servers[0].port))
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in _command(s.port, "CLUSTER", "INFO") for s in self.servers):
                return
            time.sleep(0.05)
        raise ConfigurationError("the Redis Cluster did not reach cluster_state:ok in time")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
