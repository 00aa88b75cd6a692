"""The `flashteam` command as a user runs it: a subprocess with a real private redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
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


def _send(
    url: str, token: str | None = None, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """GET, or POST ``body``; the status and the JSON answer. A refused connection raises."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
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
        assert _send(f"{url}/readyz")[0] == 200
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
        assert _send(f"{url}/v1/campaigns/nope", tokens["gateway"])[0] == 404
        assert _send(f"{url}/v1/campaigns/nope", "wrong-token")[0] == 401
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


GATEWAY = "gateway-token-for-the-cli-tests-000001"
ADMIN = "admin-token-for-the-cli-tests-0000001"


def _start_run(tmp_path: Path, port: int, *flags: str, **settings: str) -> subprocess.Popen[str]:
    env = _env(tmp_path) | {"FLASHTEAM_GATEWAY_TOKEN": GATEWAY, "FLASHTEAM_ADMIN_TOKEN": ADMIN}
    env |= {f"FLASHTEAM_{k.upper()}": v for k, v in settings.items()}
    process = subprocess.Popen(
        [*FLASHTEAM, "run", "--port", str(port), "--workers", "1", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "stop with Ctrl-C" in line:
            break
    return process


def _child(parent: int, command: bytes, other_than: int = 0, within: float = 10.0) -> int:
    """The pid of ``parent``'s child running ``flashteam <command>``, once there is one
    other than ``other_than``; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for pid in _children(parent):
            with contextlib.suppress(OSError):
                if pid != other_than and _cmdline(pid).split(b"\0")[3:4] == [command]:
                    return pid
        time.sleep(0.02)
    raise AssertionError(f"no new {command!r} process within {within} s")


def _metric(text: str, name: str) -> float | None:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


def _scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_run_restarts_a_killed_flush_worker_while_the_api_keeps_serving(tmp_path: Path) -> None:
    """kill -9 of the flush worker, five times during a stream of reservations and payments:
    every request answered, a new worker within 2 s, the durable lag under 2 s within 5 s of
    each kill (the new worker resumes its predecessor's entries under the same name), every
    paid order paid in SQL, and the restarts counted on /metrics and /live."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_run(tmp_path, port, rate_limit="0")
    answers: list[int] = []
    paid: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def shoppers() -> None:
        n = 0
        while not done.is_set():
            n += 1
            try:
                status, order = _send(
                    f"{url}/v1/campaigns/sale/orders",
                    GATEWAY,
                    {"user_id": f"u{n}", "sku": "sku-1", "qty": 1, "idempotency_key": f"k{n}"},
                )
                answers.append(status)
                if status == 201:
                    oid = order["order_id"]
                    body = {"user_id": f"u{n}", "payment_ref": f"p{n}"}
                    status, _ = _send(f"{url}/v1/orders/{oid}/pay", GATEWAY, body)
                    answers.append(status)
                    if status == 200:
                        paid.append(oid)
            except BaseException as exc:  # a refused connection, a timeout
                failures.append(exc)
                return

    try:
        now = datetime.now(UTC)
        campaign = campaign_json(flash_campaign(now, stock=1_000_000, limit=1, starts_in=-5))
        assert _send(f"{url}/v1/campaigns", ADMIN, campaign)[0] == 201
        thread = threading.Thread(target=shoppers)
        thread.start()
        worker = _child(process.pid, b"worker")
        for _ in range(5):
            time.sleep(1.0)  # events pile up in the outbox meanwhile
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            worker = _child(process.pid, b"worker", other_than=worker, within=2.0)
            while (lag := _metric(_scrape(url), "flashteam_stream_lag_seconds")) is None or (
                lag >= 2.0
            ):
                assert time.monotonic() - killed < 5.0, f"stream lag still {lag} s"
                time.sleep(0.1)
        done.set()
        thread.join(timeout=30)
        assert not failures, failures
        assert len(paid) > 50 and set(answers) == {200, 201}, sorted(set(answers))
        database = tmp_path / "var" / "flashteam.db"
        with contextlib.closing(sqlite3.connect(database)) as db:
            states = dict(db.execute("SELECT order_id, state FROM orders").fetchall())
        assert all(states.get(oid) == "paid" for oid in paid)
        scraped = _scrape(url)
        assert _metric(scraped, 'flashteam_process_restarts_total{process="worker"}') == 5
        assert _metric(scraped, 'flashteam_process_restarts_total{process="serve"}') == 0
        status, live = _send(f"{url}/v1/live", ADMIN)
        assert status == 200 and live["engine"]["restarts"]["worker"] == 5
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        done.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert err.count("the flush worker exited (-9); restarting it in") == 5, err


def _workers(parent: int, count: int, other_than: set[int], within: float = 10.0) -> set[int]:
    """``count`` flush worker processes of ``parent`` other than ``other_than``, once they run."""
    deadline = time.monotonic() + within
    while True:
        found = set()
        for pid in set(_children(parent)) - other_than:
            with contextlib.suppress(OSError):
                if _cmdline(pid).split(b"\0")[3:4] == [b"worker"]:
                    found.add(pid)
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"{len(found)} of {count} new flush workers"
        time.sleep(0.02)


def _worker_name(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (name,) = (v for v in environ if v.startswith(b"FLASHTEAM_WORKER_NAME="))
    return name.split(b"=", 1)[1].decode()


def test_run_starts_several_flush_workers_each_restarted_under_its_name(tmp_path: Path) -> None:
    """`flashteam run --flush-workers 3`: three flush worker processes, each under its own
    consumer name; a sale reaches SQL whole; the second worker killed -9 comes back under its
    name (its pending entries resumed at once) and the restart is counted once. 0 workers is
    refused."""
    refused = subprocess.run(
        [*FLASHTEAM, "run", "--flush-workers", "0"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "--flush-workers must be 1 or more" in refused.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_run(tmp_path, port, "--flush-workers", "3", rate_limit="0")
    try:
        pids = _workers(process.pid, 3, set())
        names = sorted(_worker_name(p) for p in pids)
        base = f"{socket.gethostname()}-{port}-worker"
        assert names == [base, f"{base}-2", f"{base}-3"], names
        now = datetime.now(UTC)
        campaign = campaign_json(flash_campaign(now, stock=1_000, limit=1, starts_in=-5))
        assert _send(f"{url}/v1/campaigns", ADMIN, campaign)[0] == 201
        (second,) = (p for p in pids if _worker_name(p) == f"{base}-2")
        os.kill(second, signal.SIGKILL)
        for n in range(200):
            body = {"user_id": f"u{n}", "sku": "sku-1", "qty": 1, "idempotency_key": f"k{n}"}
            assert _send(f"{url}/v1/campaigns/sale/orders", GATEWAY, body)[0] == 201
        (again,) = _workers(process.pid, 1, pids)
        assert _worker_name(again) == f"{base}-2"
        database = tmp_path / "var" / "flashteam.db"
        deadline = time.monotonic() + 20
        while True:
            with contextlib.closing(sqlite3.connect(database)) as db:
                (orders,) = db.execute("SELECT COUNT(*) FROM orders").fetchone()
            if orders == 200:
                break
            assert time.monotonic() < deadline, f"{orders} of 200 orders in SQL"
            time.sleep(0.2)
        scraped = _scrape(url)
        assert _metric(scraped, 'flashteam_process_restarts_total{process="worker"}') == 1
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert err.count("the flush worker 2 exited (-9); restarting it in") == 1, err


def test_run_stops_everything_on_a_crash_loop(tmp_path: Path) -> None:
    """A process that keeps exiting (here: more than 2 times within 60 s) stops the engine:
    run says so and exits 1, and no child outlives it."""
    process = _start_run(tmp_path, free_port(), restart_limit="2")
    try:
        reaper = 0
        for _ in range(3):
            reaper = _child(process.pid, b"reaper", other_than=reaper)
            children = _children(process.pid)
            os.kill(reaper, signal.SIGKILL)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, err
    assert "the reaper exited (-9); restarting it in 0.2 s" in err
    assert "the reaper exited 3 times within 60 s (last: -9): a crash loop" in err
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
            assert _send(f"{url}/readyz")[0] == 503
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
