"""The `flashteam` command as a user runs it: a subprocess with a real private redis-server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from engine.local.process import free_port

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
        assert set(tokens) == {"gateway", "admin"} and all(len(t) >= 16 for t in tokens.values())
        assert any(line.strip().startswith("Redis:") for line in lines)
        assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir()
        assert (tmp_path / "var" / "flashteam.db").is_file()
        url = f"http://127.0.0.1:{port}"
        assert _get(f"{url}/readyz")[0] == 200
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
