"""The machine a benchmark run measured on: the report's first table."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata

LIBRARIES = ("redis", "hiredis", "uvloop", "asyncpg", "pytest-benchmark")


def machine() -> list[tuple[str, str]]:
    """What the numbers were measured on, as (what, value) pairs."""
    mem_kb = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    ram = f"{int(mem_kb) / 2**20:.1f} GiB" if mem_kb.isdigit() else "?"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", _proc_field("/proc/cpuinfo", "model name")),
        ("cores", str(os.cpu_count())),
        ("RAM", ram),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("redis-server", _first_line(["redis-server", "--version"])),
        ("PostgreSQL", _postgres_version()),
        ("libraries", ", ".join(f"{p} {_version(p)}" for p in LIBRARIES)),
        ("load average when the report was made (1, 5, 15 min)", load),
    ]


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not found"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _postgres_version() -> str:
    try:
        from engine.local.postgres import postgres_bin_dir

        return _first_line([str(postgres_bin_dir() / "postgres"), "--version"])
    except Exception:  # not installed: the report says so
        return "not found"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
