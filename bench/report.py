"""A benchmark's figures: printed as a table and kept as JSON under ``var/bench/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path("var") / "bench"


def report(name: str, title: str, rows: list[dict[str, Any]]) -> None:
    """Print ``rows`` (one dict per measurement, same keys) and write ``var/bench/<name>.json``."""
    columns = list(rows[0])
    widths = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [
        "  ".join(_cell(r[c]).rjust(w) for c, w in zip(columns, widths, strict=True)) for r in rows
    ]
    print("\n" + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))


def _cell(value: Any) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else str(value)
