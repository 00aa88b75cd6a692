"""One local engine: a private redis-server unless a Redis URL is given, the engine's
environment, and its processes (the HTTP API, the flush worker, the reaper), supervised: a
process that exits is started again, and a crash loop stops the engine.

``LocalEngine`` is what `flashteam run` runs in the foreground and what `make loadtest`
starts for a run; ``ApiServer`` is the API alone with fixed tokens, what the HTTP tests and
the HTTP benchmark talk to over real sockets. Every process is ``python -m engine.cli
<command>`` with the resolved settings handed over as ``FLASHTEAM_*`` variables
(``Settings.to_env``), so each child reads exactly the configuration its launcher resolved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self

from engine.local.process import Server, die_with_parent, free_port, with_parent
from engine.local.redis_server import RedisServer
from engine.settings import API_HOST, API_PORT, API_WORKERS, Settings, redact

logger = logging.getLogger("flashteam")

Service = Literal["api", "flush worker", "reaper"]
EVERYTHING: tuple[Service, ...] = ("api", "flush worker", "reaper")
_COMMANDS: dict[Service, tuple[str, ...]] = {
    "api": ("serve",),
    "flush worker": ("worker",),
    "reaper": ("reaper",),
}
_STOP_TIMEOUT = 20.0  # the API drains its requests, the flush worker finishes its batch
_POLL = 0.05  # seconds between two looks at the processes
_FIRST_BACKOFF = 0.1  # seconds before a restart, doubled by each earlier exit in the window
_MAX_BACKOFF = 1.0  # ... up to this: a crash loop is stopped by the restart limit, not waited out
#: Restarts per process since `flashteam run` started, in the data dir, for /metrics and /live.
RESTARTS_FILE = "restarts.json"
# Loopback health checks must not go through an HTTP proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: The fixed tokens of an ``ApiServer``: a throw-away test server on loopback.
TEST_GATEWAY_TOKEN = "gateway-token-for-the-tests-0001"
TEST_ADMIN_TOKEN = "admin-token-for-the-tests-0000001"


class StartFailed(RuntimeError):
    """The engine did not come up: a process exited, the API never answered, or a stop was
    requested first. Whatever had started is stopped again."""


def restarts(data_dir: Path) -> dict[str, int]:
    """Restarts per process (``serve``, ``worker``, ``reaper``) of the `flashteam run` whose
    data dir this is; empty when none supervises it (`flashteam serve` alone)."""
    try:
        counts: dict[str, int] = json.loads((data_dir / RESTARTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return counts


class LocalEngine(Server):
    """The engine on this machine: ``start()``, ``supervise()`` until ``request_stop()``
    (signal-safe) or a crash loop, then ``stop()``; or use it as a context manager.

    The settings are resolved once, here: missing tokens are generated (``generated`` names
    them), the data dir is made absolute, and the durable store defaults to SQLite in it.
    Without a Redis URL or Sentinels, ``start()`` runs a private redis-server under
    ``<data dir>/redis`` (AOF on, noeviction) and ``settings.redis_url`` names it.
    ``services`` chooses the processes (none: just the Redis, as ``flashteam demo`` uses it);
    ``flush_workers`` how many flush workers run (each its own process and consumer name,
    sharing the consumer group: "flush worker", "flush worker 2", ...).
    Their output goes to ``log`` (appended) when given, else to this process's stdout and
    stderr.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        services: tuple[Service, ...] = EVERYTHING,
        host: str = API_HOST,
        port: int = API_PORT,
        workers: int = API_WORKERS,
        flush_workers: int = 1,
        log: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        data_dir = settings.data_dir.resolve()
        self.generated = frozenset(
            name
            for name, token in (
                ("gateway", settings.gateway_token),
                ("admin", settings.admin_token),
            )
            if token is None
        )
        self.settings = settings.with_(
            data_dir=data_dir,
            database_url=settings.database_url
            or f"sqlite:///{settings.with_(data_dir=data_dir).sqlite_path}",
            gateway_token=settings.gateway_token or secrets.token_urlsafe(24),
            admin_token=settings.admin_token or secrets.token_urlsafe(24),
        )
        if "api" in services:
            self.settings.require_tokens()  # refuse weak tokens before anything starts
        self.services = services
        self.host, self.port, self.workers = host, port, workers
        self.flush_workers = flush_workers
        self.log = log
        self.start_timeout = start_timeout
        self.redis: RedisServer | None = None
        # Per process slot, the service it runs and its number among that service's slots:
        # "flush worker", "flush worker 2", ... (one slot for every other service).
        self.slots: dict[str, tuple[Service, int]] = {}
        for service in services:
            for n in range(1, (flush_workers if service == "flush worker" else 1) + 1):
                self.slots[service if n == 1 else f"{service} {n}"] = (service, n)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = dict.fromkeys(self.slots, 0)
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        """The HTTP API's base URL."""
        return f"http://{self.host}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The API's process (the parent of its worker processes), while it runs."""
        return self.processes.get("api")

    def env(self) -> dict[str, str]:
        """The environment of every process: this one's without its ``FLASHTEAM_*``
        variables, plus the resolved settings as ``FLASHTEAM_*`` variables."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTEAM_")}
        return inherited | self.settings.to_env()

    def start(self) -> Self:
        """Start the Redis (when ours) and the processes, and wait until the API answers
        ``/healthz``; StartFailed, with everything stopped again, when it does not. Starting
        a running engine does nothing."""
        if self.processes:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def supervise(self) -> int:
        """Block until ``request_stop()`` (0), restarting every process that exits on its
        own; 1 on a crash loop.

        A process that exits is logged and started again after 0.1 s, doubled for each of
        its exits within ``restart_window`` before this one, up to 1 s; the others
        keep running meanwhile (the API keeps serving while the flush worker restarts). One
        that exits more than ``restart_limit`` times within the window is in a crash loop:
        this returns 1 with the reason logged, and the caller stops the engine. Each restart
        is logged and counted in ``restarts`` (and in the data dir's restarts.json, which
        /metrics and /live read)."""
        limit, window = self.settings.restart_limit, self.settings.restart_window
        exits: dict[str, deque[float]] = {name: deque() for name in self.processes}
        due: dict[str, float] = {}  # processes waiting for their restart: when
        env = self.env()
        self._save_restarts()
        while not self.stopping.wait(_POLL):
            now = time.monotonic()
            for name, process in self.processes.items():
                if name in due or process.poll() is None:
                    continue
                recent = exits[name]
                recent.append(now)
                while now - recent[0] > window:
                    recent.popleft()
                if len(recent) > limit:
                    logger.error(
                        "the %s exited %d times within %g s (last: %s): a crash loop, stopping "
                        "the engine; its log says why it exits",
                        name,
                        len(recent),
                        window,
                        process.returncode,
                    )
                    return 1
                delay = min(_FIRST_BACKOFF * 2 ** (len(recent) - 1), _MAX_BACKOFF)
                logger.error(
                    "the %s exited (%s); restarting it in %.1f s", name, process.returncode, delay
                )
                due[name] = now + delay
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    self.processes[name] = self._spawn(name, env)
                    self.restarts[name] += 1
                    self._save_restarts()
                    logger.warning(
                        "the %s restarted (pid %d, restart %d)",
                        name,
                        self.processes[name].pid,
                        self.restarts[name],
                    )
        return 0

    def _save_restarts(self) -> None:
        counts = dict.fromkeys((_COMMANDS[s][0] for s in self.services), 0)
        for slot, n in self.restarts.items():
            counts[_COMMANDS[self.slots[slot][0]][0]] += n
        path = self.settings.data_dir / RESTARTS_FILE
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(counts))
        staged.replace(path)  # readers never see half a file

    def request_stop(self) -> None:
        """Make ``start()`` give up and ``supervise()`` return; safe in a signal handler."""
        self.stopping.set()

    def stop(self) -> None:
        """SIGTERM to every process, up to 20 s each to finish (then SIGKILL), then the
        private redis-server (its AOF flushed); the restart counts go. A stopped engine can be
        started again."""
        processes, self.processes = self.processes, {}
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.redis is not None:
            self.redis.stop()
        # The counts describe this run only: nothing stale for a later `flashteam serve`.
        (self.settings.data_dir / RESTARTS_FILE).unlink(missing_ok=True)

    def _start(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # also a data dir made by an older version, or by hand
        if (
            self.redis is None
            and self.settings.redis_url is None
            and not self.settings.redis_sentinels
        ):
            self.redis = RedisServer(
                data_dir / "redis",
                appendfsync=self.settings.appendfsync,
                password=_private_password(data_dir / "redis"),
            )
            self.settings = self.settings.with_(redis_url=self.redis.url)
        if self.redis is not None:
            self.redis.start()  # again on a restart: the same port, its AOF reloaded
            logger.info(
                "private redis-server on %s (data in %s)",
                redact(self.redis.url),
                self.redis.data_dir,
            )
        env = self.env()
        for slot in self.slots:
            self.processes[slot] = self._spawn(slot, env)
        if "api" in self.processes:
            self._wait_healthy()

    def _spawn(self, slot: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        service, number = self.slots[slot]
        command = [sys.executable, "-m", "engine.cli", *_COMMANDS[service]]
        if service == "api":
            command += ["--host", self.host, "--port", str(self.port)]
            command += ["--workers", str(self.workers)]
        if service == "flush worker":
            # One name per slot, so a restarted worker reads its predecessor's pending
            # entries at once instead of waiting FLASHTEAM_CLAIM_IDLE to claim them.
            name = self.settings.worker_name or f"{socket.gethostname()}-{self.port}-worker"
            env = env | {"FLASHTEAM_WORKER_NAME": name if number == 1 else f"{name}-{number}"}
        # umask: the files it creates (the SQLite database) are for this user only.
        # Each process stops with the one that started it (killed or not): no orphan keeps a
        # port, a Redis connection or a flush slot.
        dies = with_parent(die_with_parent)
        if self.log is None:
            return subprocess.Popen(command, env=env, umask=0o077, preexec_fn=dies)
        # A file, not a pipe: a pipe nobody reads blocks the process once it is full.
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            return subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                umask=0o077,
                preexec_fn=dies,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.stopping.is_set():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise StartFailed(f"the {name} exited ({process.returncode}){self._log_tail()}")
            with contextlib.suppress(OSError), _DIRECT.open(f"{self.url}/healthz", timeout=1):
                return
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"the API did not answer /healthz within {self.start_timeout:g} s"
                    + self._log_tail()
                )
            self.stopping.wait(0.05)
        raise StartFailed("stopped before the API answered")

    def _log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return f"; the end of {self.log}:\n{self.log.read_text(errors='replace')[-2000:]}"


WIDE_OPEN = 1 << 20  # requests an ApiServer worker runs at once before it sheds any


def _private_password(redis_dir: Path) -> str:
    """The private redis-server's password: kept in ``<redis_dir>/password`` (0600), made
    at the first start (so a restart keeps its clients' URL), never printed."""
    redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = redis_dir / "password"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


class ApiServer(LocalEngine):
    """The HTTP API alone (no flush worker, no reaper) on a free loopback port, on the given
    Redis and SQLite under ``data_dir``, with the test tokens, the rate limit off and
    admission control wide open (a test's burst of thousands of concurrent calls is run, not
    shed; tests of shedding narrow it); its output goes to ``<data dir>/serve.log``.
    ``extra`` sets more settings by field name, as their variables would
    (``{"rate_limit": "2"}``)."""

    def __init__(
        self,
        redis_url: str,
        data_dir: Path,
        workers: int = API_WORKERS,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        values = {
            "redis_url": redis_url,
            "data_dir": str(data_dir),
            "gateway_token": TEST_GATEWAY_TOKEN,
            "admin_token": TEST_ADMIN_TOKEN,
            "rate_limit": "0",
            "admission_min": str(WIDE_OPEN),
            "admission_max": str(WIDE_OPEN),
            **(extra or {}),
        }
        settings = Settings.from_env({f"FLASHTEAM_{k.upper()}": v for k, v in values.items()})
        super().__init__(
            settings,
            services=("api",),
            port=free_port(),
            workers=workers,
            log=data_dir / "serve.log",
        )
