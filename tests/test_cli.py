"""The `flashteam` command as a user runs it: a subprocess with a real private redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.local.postgres import PostgresServer
from engine.local.process import free_port
from engine.local.redis_server import RedisServer
from testkit.factories import campaign_json, flash_campaign

FLASHTEAM = [sys.executable, "-m", "engine.cli"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTEAM_")}
    env["FLASHTEAM_DATA_DIR"] = str(tmp_path / "var")
    return env


def test_demo_sells_out_without_oversell_and_fills_teams_exactly(tmp_path: Path) -> None:
    done = subprocess.run(
        [*FLASHTEAM, "demo", "--shoppers", "2000", "--stock", "100", "--team-shoppers", "600"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "no oversell: paid" in done.stdout
    assert "invariants I1, I2 (stock, limits; docs/invariants.md): OK" in done.stdout
    assert "sold_out" in done.stdout
    assert (
        "invariants I1-I3 (stock, limits, no over-filled team; docs/invariants.md): OK"
        in done.stdout
    )
    assert "(= seats of succeeded teams: OK)" in done.stdout
    assert "(leaders at 2990, members at 3990: OK)" in done.stdout
    automatic = re.search(r"automatic +(\d+) ", done.stdout)
    assert automatic and int(automatic.group(1)) > 0, done.stdout  # the option was exercised


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_run_starts_everything_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*FLASHTEAM, "run", "--port", str(port), "--workers", "1"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith(f"flashteam is running: API http://127.0.0.1:{port}"), first
        lines: list[str] = []
        while "stop with Ctrl-C" not in (line := process.stdout.readline()):
            lines.append(line)
        tokens = {line.split()[0]: line.split()[2] for line in lines if " token:" in line}
        assert set(tokens) == {"gateway", "admin"} and all(len(t) >= 32 for t in tokens.values())
        (redis_line,) = (line.strip() for line in lines if line.strip().startswith("Redis:"))
        var = tmp_path / "var"
        assert (var / "redis" / "appendonlydir").is_dir()
        assert (var / "flashteam.db").is_file()
        url = f"http://127.0.0.1:{port}"
        assert _get(f"{url}/readyz")[0] == 200
        # The private Redis: a password of its own, kept in var/ for this user alone, never
        # printed nor on a command line; a client without it is refused.
        password = (var / "redis" / "password").read_text().strip()
        assert len(password) >= 32 and password not in "".join(lines)
        found = re.search(r"127\.0\.0\.1:(\d+)", redis_line)
        assert found is not None and "***" in redis_line, redis_line
        redis_port = int(found.group(1))
        assert _redis_says(redis_port, b"PING").startswith(b"-NOAUTH")
        assert _redis_says(redis_port, b"AUTH " + password.encode() + b"\r\nPING").endswith(
            b"+PONG\r\n"
        )
        assert password.encode() not in _every_command_line()
        assert var.stat().st_mode & 0o777 == 0o700
        for path in (var / "flashteam.db", var / "redis" / "password"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert _get(f"{url}/v1/campaigns/nope", tokens["gateway"])[0] == 404
        assert _get(f"{url}/v1/campaigns/nope", "wrong-token")[0] == 401
        children = _children(process.pid)
        assert len(children) >= 3, children  # the API, the flush worker, the reaper
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "flashteam stopped" in out
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "a child outlived run"


def _redis_says(port: int, command: bytes) -> bytes:
    """What the redis-server on ``port`` answers to ``command`` (CRLF-separated commands)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        reply = b""
        while reply.count(b"\r\n") < command.count(b"\r\n") + 1:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
        return reply


def _every_command_line() -> bytes:
    """The command lines of every process of the host, as any local user can read them."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append((entry / "cmdline").read_bytes())
    return b"\n".join(lines)


def test_run_stops_everything_when_a_process_dies(tmp_path: Path) -> None:
    """The launcher supervises: a reaper that dies takes the rest down, and run exits 1."""
    process = subprocess.Popen(
        [*FLASHTEAM, "run", "--port", str(free_port()), "--workers", "1"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "stop with Ctrl-C" in line:
                break
        children = _children(process.pid)
        reaper = next(pid for pid in children if b"reaper" in _cmdline(pid))
        os.kill(reaper, signal.SIGKILL)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, err
    assert "the reaper exited" in err
    assert "flashteam stopped" in out
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "a child outlived run"


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    env = _env(tmp_path) | {"FLASHTEAM_RATE_LIMIT": "lots"}
    done = subprocess.run([*FLASHTEAM, "run"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "FLASHTEAM_RATE_LIMIT must be a number" in done.stderr


def test_no_secret_in_any_log_line_of_any_process(
    postgres_server: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """`flashteam run` (API, flush worker, reaper) and a one-shot command, with a password
    in the Redis URL and in the PostgreSQL URL and tokens from the environment, through a
    sale, a refused payment and a Redis outage: no password, token or payment reference in
    anything any of them prints or logs."""
    redis_password, pg_password = "redis-pw-" + "7" * 24, "pg-pw-" + "5" * 24
    gateway, admin = "gw-" + "0123456789abcdef" * 2, "adm-" + "fedcba9876543210" * 2
    payment_ref = "psp-ref-never-logged-42"
    database_url = pg_url.replace("://flashteam@", f"://flashteam:{pg_password}@", 1)
    assert pg_password in database_url
    port = free_port()
    with RedisServer(tmp_path / "redis", password=redis_password) as redis_server:
        env = _env(tmp_path) | {
            "FLASHTEAM_REDIS_URL": redis_server.url,
            "FLASHTEAM_DATABASE_URL": database_url,
            "FLASHTEAM_GATEWAY_TOKEN": gateway,
            "FLASHTEAM_ADMIN_TOKEN": admin,
        }
        process = subprocess.Popen(
            [*FLASHTEAM, "run", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        printed: list[str] = []
        try:
            assert process.stdout is not None
            while "stop with Ctrl-C" not in (line := process.stdout.readline()):
                assert line, "flashteam run stopped early"
                printed.append(line)
            url = f"http://127.0.0.1:{port}"
            start = datetime.now(UTC)
            campaign = campaign_json(flash_campaign(start, "secrets"))
            assert _post(f"{url}/v1/campaigns", admin, campaign)[0] == 201
            body = {"user_id": "u1", "sku": "sku-1", "qty": 1, "idempotency_key": "k1"}
            orders = f"{url}/v1/campaigns/secrets/orders"
            _, held = _post(orders, gateway, body)
            _, other = _post(orders, gateway, body | {"user_id": "u2"})
            pay = {"user_id": "u1", "payment_ref": payment_ref}
            assert _post(f"{url}/v1/orders/{held['order_id']}/pay", gateway, pay)[0] == 200
            reused = pay | {"user_id": "u2"}
            assert _post(f"{url}/v1/orders/{other['order_id']}/pay", gateway, reused)[0] == 409
            redis_server.stop()
            assert _get(f"{url}/readyz")[0] == 503
            assert _post(orders, gateway, body | {"idempotency_key": "k2"})[0] == 503
            redis_server.start()
            drained = subprocess.run(  # a one-shot command, logging at DEBUG level
                [*FLASHTEAM, "-v", "worker", "--drain"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    logged = "".join(printed) + out + err
    logged += drained.stdout + drained.stderr
    assert "Redis" in logged and "redis://:***@127.0.0.1" in logged, logged
    assert "503" in logged or "unavailable" in logged, logged  # the outage was logged
    for secret in (redis_password, pg_password, gateway, admin, payment_ref):
        assert secret not in logged, f"{secret} logged:\n{logged}"


def _post(url: str, token: str, body: object) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
