"""The benchmarks' results as the report reads them: one ``var/bench/<name>.json`` each."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Rows = list[Row]

# What the ``impl`` column of the T1 results names.
IMPLEMENTATIONS = {
    "engine": "engine, coalesced (default)",
    "engine-uncoalesced": "engine, one EVALSHA per request",
    "bare-batched": "bare batch.lua loop, 64 per EVALSHA (Redis ceiling)",
    "redis-watch": "WATCH/MULTI optimistic reserve (Python)",
    "postgres": "PostgreSQL conditional UPDATE + INSERT (asyncpg)",
}


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark's JSON: its title, rows and when it was written."""

    name: str
    title: str
    rows: Rows
    written: dt.datetime


Results = Mapping[str, Result]


def load_results(folder: Path) -> dict[str, Result]:
    """Every ``<name>.json`` of ``folder`` with at least one row, by name.

    A file that cannot be read or holds no rows is left out: the report then says
    "not measured" for whatever it would have shown.
    """
    results: dict[str, Result] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            continue
        written = dt.datetime.fromtimestamp(path.stat().st_mtime)
        results[path.stem] = Result(path.stem, str(data.get("title", path.stem)), rows, written)
    return results


def top_level(rows: Rows, key: str = "concurrency") -> Rows:
    """The rows of the highest level measured (T1 and T3 are judged at 1,000 callers)."""
    level = max(int(r[key]) for r in rows)
    return [r for r in rows if int(r[key]) == level]


def by(rows: Rows, key: str) -> dict[str, Row]:
    """``rows`` by the text of their ``key`` column (the last row of a repeated value wins)."""
    return {str(r.get(key)): r for r in rows}
