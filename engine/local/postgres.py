"""A private PostgreSQL cluster on a free loopback port, for the tests and the benchmarks.

``PostgresServer`` runs ``initdb`` once (trust auth, user ``flashteam``), then ``postgres`` as a
child process bound to 127.0.0.1 only, and creates the ``flashteam`` database. ``stop()`` and
``start()`` again reuse the same cluster and port, so tests can take PostgreSQL away mid-run.

PostgreSQL refuses to run as root. When this process is root, every PostgreSQL binary runs as
the ``postgres`` user, and the cluster lives in a private temp dir owned by it (the caller's
``data_dir`` may sit under a root-only 0700 dir such as /tmp/pytest-of-root); that temp dir
is deleted when the context manager exits (or on ``close()``). Otherwise the cluster lives
in ``data_dir/pgdata`` and is kept, like RedisServer's AOF.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.errors import ConfigurationError
from engine.local.process import Server, die_with_parent, free_port, with_parent

USER = "flashteam"
DATABASE = "flashteam"
_OS_USER = "postgres"
_START_TIMEOUT = 60.0  # a ceiling: the wait returns as soon as the server answers
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.<port>"


def postgres_bin_dir() -> Path:
    """The directory holding initdb, postgres and pg_ctl; ConfigurationError when missing."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:  # Debian/Ubuntu keep the server binaries off PATH
        return Path(candidates[0]).parent
    raise ConfigurationError(
        "PostgreSQL is not installed (no initdb on PATH): run "
        "`sudo apt-get install postgresql-15` (or your platform's PostgreSQL server package), "
        "or set FLASHTEAM_DATABASE_URL to a PostgreSQL you run yourself"
    )


def _fast_shutdown_with_parent() -> None:
    """In the child before exec: a fast shutdown (SIGINT) when its parent thread dies."""
    die_with_parent(signal.SIGINT)


class PostgresServer(Server):
    """One postgres child process on 127.0.0.1:``port``, trust auth, database ``flashteam``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._account = pwd.getpwnam(_OS_USER) if os.geteuid() == 0 else None
        self._temp_root: Path | None = None

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        """The URL of another database of this cluster (tests create one per test)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @property
    def pgdata(self) -> Path:
        """The cluster's directory (PGDATA)."""
        if self._account is None:
            return self.data_dir.resolve() / "pgdata"
        if self._temp_root is None:
            self._temp_root = Path(tempfile.mkdtemp(prefix="flashteam-pg-"))
            os.chown(self._temp_root, self._account.pw_uid, self._account.pw_gid)
        return self._temp_root / "pgdata"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> PostgresServer:
        """Create the cluster on first use, start postgres and wait until it accepts logins."""
        if self.running:
            return self
        bin_dir = postgres_bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if fresh:
            self._run(bin_dir / "initdb", "-D", str(self.pgdata), "-A", "trust", "-U", USER,
                      "-E", "UTF8", "--locale=C", "--no-instructions")  # fmt: skip
        sockets = str(self.pgdata) if len(str(self.pgdata)) < _SOCKET_PATH_MAX else ""
        command = [
            str(bin_dir / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={sockets}",
        ]  # fmt: skip
        with (self.data_dir / "postgres.log").open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=with_parent(_fast_shutdown_with_parent),
                **self._as_owner(),
            )
        try:
            self._wait_ready()
            if fresh:
                self._run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(self.port),
                          "-U", USER, DATABASE)  # fmt: skip
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop postgres, keeping the cluster: ``pg_ctl stop -m fast`` (sessions are ended,
        everything committed is on disk), ``-m immediate`` (a crash: recovery on the next
        start) when ``kill``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        mode = "immediate" if kill else "fast"
        pg_ctl = postgres_bin_dir() / "pg_ctl"
        try:
            self._run(pg_ctl, "stop", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "30")
        except (ConfigurationError, OSError, subprocess.SubprocessError):
            # pg_ctl missing or failed: the same shutdown mode, signalled directly.
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGQUIT if kill else signal.SIGINT)
        try:
            process.wait(timeout=_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop postgres and delete the private temp dir the cluster lives in (root only);
        a cluster about to be deleted skips the shutdown checkpoint (immediate stop)."""
        self.stop(kill=self._temp_root is not None)
        root, self._temp_root = self._temp_root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def _as_owner(self) -> dict[str, Any]:
        """Popen arguments that run a PostgreSQL binary as the cluster's owner."""
        if self._account is None:
            return {"cwd": self.data_dir}
        return {
            "user": self._account.pw_uid,
            "group": self._account.pw_gid,
            "extra_groups": [],
            "cwd": self.pgdata.parent,  # reachable by postgres, unlike a 0700 root dir
            "env": {**os.environ, "HOME": str(self.pgdata.parent), "USER": _OS_USER},
        }

    def _run(self, binary: Path, *args: str) -> None:
        result = subprocess.run(
            [str(binary), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_START_TIMEOUT * 2,
            check=False,
            **self._as_owner(),
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise ConfigurationError(f"{binary.name} failed ({result.returncode}): {output}")

    def _wait_ready(self) -> None:
        """Wait for postmaster.pid to name our process and say ``ready`` (what pg_ctl -w does)."""
        process = self._process
        assert process is not None
        pid_file = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigurationError(
                    f"postgres exited with {process.returncode}; "
                    f"see {self.data_dir / 'postgres.log'}"
                )
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(process.pid) and lines[7].strip() == "ready":
                    return
            time.sleep(0.02)
        raise ConfigurationError(f"postgres on port {self.port} did not start in time")
