"""The `flashteam` command as a user runs it: a subprocess with a real private redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
    assert "invariants (SPEC 6.1, 6.2): OK" in done.stdout
    assert "sold_out" in done.stdout
    assert "invariants (SPEC 6.1-6.3: stock, limits, no over-filled team): OK" in done.stdout
    assert "= 3 x succeeded teams: OK" in done.stdout


def test_run_starts_private_redis_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*FLASHTEAM, "run"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("flashteam is running on Redis redis://127.0.0.1:"), first
        while "stop with Ctrl-C" not in process.stdout.readline():
            pass
        assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir()
        assert (tmp_path / "var" / "flashteam.db").is_file()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "flashteam stopped" in out


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    env = _env(tmp_path) | {"FLASHTEAM_RATE_LIMIT": "lots"}
    done = subprocess.run([*FLASHTEAM, "run"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "FLASHTEAM_RATE_LIMIT must be a number" in done.stderr
