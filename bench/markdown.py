"""Markdown for the report: table cells, tables, text blocks and chart links."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.results import Result, Rows


def fmt(value: Any) -> str:
    """A table cell: thousands separators, precision by magnitude."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 1:
            return f"{value:,.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def table(rows: Rows, columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (the first row's keys unless ``columns``)."""
    names = list(columns or rows[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in names) + " |" for row in rows]
    return "\n".join(lines)


def tabled(intro: str, result: Result) -> list[str]:
    """A paragraph, then ``result``'s table."""
    return [intro, "", table(result.rows), ""]


def image(path: str | None, alt: str) -> list[str]:
    """A chart's line, or nothing when no chart was drawn."""
    return [f"![{alt}]({path})", ""] if path else []
