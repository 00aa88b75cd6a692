"""`flashteam serve` as a subprocess on a free loopback port: what the HTTP tests, the load
tests and the HTTP benchmark talk to over real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from engine.local.process import free_port

GATEWAY = "gateway-token-for-tests-0001"
ADMIN = "admin-token-for-tests-00000001"


@dataclass
class ApiServer:
    """One API server: ``workers`` uvicorn processes on ``url``, on the given Redis and a
    SQLite file under ``data_dir``. ``extra`` adds FLASHTEAM_* settings."""

    redis_url: str
    data_dir: Path
    workers: int = 2
    extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'flashteam.db'}"

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTEAM_")}
        return {
            **base,
            "FLASHTEAM_REDIS_URL": self.redis_url,
            "FLASHTEAM_DATABASE_URL": self.database_url,
            "FLASHTEAM_DATA_DIR": str(self.data_dir),
            "FLASHTEAM_GATEWAY_TOKEN": GATEWAY,
            "FLASHTEAM_ADMIN_TOKEN": ADMIN,
            "FLASHTEAM_RATE_LIMIT": "0",
            **{f"FLASHTEAM_{k.upper()}": v for k, v in self.extra.items()},
        }

    def start(self) -> ApiServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "engine.cli", "serve", "--port", str(self.port)]
        # The server's log goes to a file: a pipe nobody reads would block it once full.
        self.log = self.data_dir / "serve.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--workers", str(self.workers)], env=self.env(), stderr=log
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flashteam serve exited: {self.log.read_text()[-2000:]}")
            with suppress(OSError), urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("flashteam serve did not answer /healthz within 30 s")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
