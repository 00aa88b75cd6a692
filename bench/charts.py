"""The report's PNG charts (matplotlib, no display needed), written next to the report.

Every chart method returns the PNG's file name, or None when matplotlib is missing or there
is nothing to draw; ``bench.markdown.image`` turns that into the report's line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.results import Rows

Points = list[tuple[float, float]]
Series = dict[str, Points]


def series(rows: Rows, key: str, value: str, x: str = "concurrency") -> Series:
    """One line per distinct ``key`` of ``rows``: (``x``, ``value``) points."""
    out: Series = {}
    for row in rows:
        out.setdefault(str(row[key]), []).append((float(row[x]), float(row[value])))
    return out


class Charts:
    """Draws the charts of one report as ``<folder>/<prefix>-<name>.png``."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        try:
            from matplotlib.figure import Figure
        except ImportError:
            self.available = False
        else:
            self.available = True
            self._figure = Figure

    def lines(
        self,
        name: str,
        title: str,
        lines: Series,
        ylabel: str,
        *,
        logy: bool = True,
        floors: Sequence[tuple[float, str]] = (),
    ) -> str | None:
        """One line per series over concurrency (log x); a grey dashed line per floor."""
        if not self.available or not lines:
            return None
        fig, ax = self._axes(4.5)
        for label, points in lines.items():
            ax.plot(*_xy(points), marker="o", label=label)
        for value, label in floors:
            ax.axhline(value, linestyle="--", linewidth=1, color="grey")
            ax.text(
                0.99,
                value,
                f"target {label}",
                transform=ax.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=7,
                color="grey",
            )
        _over_callers(ax, title, ylabel, logy=logy)
        ax.legend(fontsize=8)
        return self._save(fig, name)

    def latency(self, name: str, title: str, rows: Rows) -> str | None:
        """p99 (solid) and p50 (dashed) per implementation over concurrency, one color each."""
        if not self.available or not rows:
            return None
        fig, ax = self._axes(4.5)
        p99, p50 = series(rows, "impl", "p99_ms"), series(rows, "impl", "p50_ms")
        for i, (label, points) in enumerate(p99.items()):
            color = f"C{i}"
            ax.plot(*_xy(points), marker="o", color=color, label=f"{label} p99")
            ax.plot(*_xy(p50[label]), marker=".", linestyle="--", color=color, label=f"{label} p50")
        _over_callers(ax, title, "ms (log)", logy=True)
        ax.legend(fontsize=7, ncols=2)
        return self._save(fig, name)

    def bars(
        self, name: str, title: str, labels: list[str], values: list[float], ylabel: str
    ) -> str | None:
        """One bar per label."""
        if not self.available or not labels:
            return None
        fig, ax = self._axes(4.0)
        ax.bar(labels, values, color="tab:blue")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        return self._save(fig, name)

    def xy(self, name: str, title: str, points: Points, xlabel: str, ylabel: str) -> str | None:
        """One line from zero up (linear axes)."""
        if not self.available or not points:
            return None
        fig, ax = self._axes(4.0)
        xs, ys = _xy(points)
        ax.plot(xs, ys, marker="o")
        ax.set_ylim(0, max(ys) * 1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        return self._save(fig, name)

    def _axes(self, height: float) -> tuple[Any, Any]:
        fig = self._figure(figsize=(7.5, height))
        return fig, fig.subplots()

    def _save(self, fig: Any, name: str) -> str:
        fig.tight_layout()
        path = self.folder / f"{self.prefix}-{name}.png"
        fig.savefig(path, dpi=110)
        return path.name


def _xy(points: Points) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xs, ys = zip(*sorted(points), strict=True)
    return xs, ys


def _over_callers(ax: Any, title: str, ylabel: str, *, logy: bool) -> None:
    """The axes of a chart over the number of concurrent callers (log x)."""
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
