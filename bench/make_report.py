"""The benchmark report: ``python -m bench.make_report`` (the last step of ``make bench``).

Reads every ``var/bench/*.json`` the benchmarks wrote (``bench.report.report``) and writes
``bench/reports/<YYYY-MM-DD>.md`` with PNG charts next to it: the machine it ran on, every
performance target of docs/performance.md (T1 to T10) with its measured value, its baseline
and a plain verdict (met, NOT met, or not measured), then each benchmark's table and charts.

Options: ``--results DIR`` (default ``var/bench``), ``--out DIR`` (default ``bench/reports``),
``--date YYYY-MM-DD`` (default today).
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from bench.charts import Charts
from bench.machine import machine
from bench.report import RESULTS
from bench.results import Results, load_results
from bench.sections import benchmark_sections, machine_section, targets_section
from bench.targets import verdicts


def render(results: Results, charts: Charts, day: str) -> str:
    """The report of ``day`` from ``results``, drawing its charts with ``charts``."""
    out = [
        f"# flashteam benchmark report, {day}",
        "",
        "Made by `python -m bench.make_report` from `var/bench/*.json` (`make bench`). "
        "Ratios are measured side by side in one run on one machine (docs/performance.md); "
        "absolute numbers depend on what else the machine ran (see the load average).",
        "",
        *machine_section(machine()),
        *targets_section(verdicts(results)),
        *benchmark_sections(results, charts),
        "## Result files",
        "",
        *(f"- `{r.name}.json`: {r.title} ({r.written:%Y-%m-%d %H:%M})" for r in results.values()),
        "",
    ]
    if not charts.available:
        out += ["(matplotlib is not installed: no charts.)", ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; the options are those of the module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.make_report", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=Path("bench") / "reports")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    args = parser.parse_args(argv)
    results = load_results(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    charts = Charts(args.out, args.date)
    path = args.out / f"{args.date}.md"
    path.write_text(render(results, charts, args.date))
    print(f"wrote {path} ({len(results)} result files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
