"""The timeline of a load run: what the engine's /metrics and its campaigns' stock said every
second, as per-second rates, latency quantiles and four PNG charts.

``python -m loadtests.run`` samples the engine once a second while the load runs and the
sale settles (``Timeline.add``: the /metrics text and ``GET /v1/campaigns/{id}`` of each
campaign of the run), keeps the samples as ``<name>-timeline.json`` and draws, next to the
other reports:

- ``<name>-timeline-requests.png``: requests per second by outcome (``ok``, ``sold_out``, ...),
  from the increase of ``flashteam_http_request_seconds``' count between two samples, summed
  over the routes (the sampler's own ``GET /metrics`` left out);
- ``<name>-timeline-latency.png``: p50 and p99 of each second, from the increase of the same
  histogram's buckets (what Prometheus' ``histogram_quantile`` makes of ``rate(..._bucket)``),
  all routes together, then p99 per route for the busiest routes;
- ``<name>-timeline-stock.png``: units available, held and paid per item, per campaign;
- ``<name>-timeline-lag.png``: ``flashteam_stream_lag_seconds`` and
  ``flashteam_reaper_lag_seconds`` against their alert thresholds (deploy/prometheus/alerts.yml),
  with the unflushed outbox entries.

The arithmetic is pure functions for the tests: ``parse_metrics``, ``increase`` (a counter
that went back was reset), ``interval_deltas``, ``rates_by_outcome``, ``merged`` and
``quantile``. The charts use matplotlib's object API (no pyplot state, no display); without
matplotlib ``draw`` returns None and the run says the charts were skipped. Time is in seconds
since the sale opened (the campaigns' ``starts_at``), so the load starts a little before 0.
``python -m loadtests.timeline <name>-timeline.json`` draws the charts again from the file.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "flashteam_http_request_seconds"
STREAM_LAG = "flashteam_stream_lag_seconds"
REAPER_LAG = "flashteam_reaper_lag_seconds"
UNFLUSHED = "flashteam_stream_unflushed"
#: The gauges kept from each scrape (engine/api/metrics.py).
GAUGES = (STREAM_LAG, REAPER_LAG, UNFLUSHED, "flashteam_stream_pending", "flashteam_dead_letters")
#: The sampler's own requests, left out of the rates and quantiles.
OWN_ROUTES = frozenset({"GET /metrics"})
#: What a campaign's stock says of each item (GET /v1/campaigns/{id}).
STOCK_FIELDS = ("available", "held", "paid", "gone")
INF = math.inf
ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
#: The charts, by kind: ``<name>-timeline-<kind>.png`` and what each shows.
CHARTS = {
    "requests": "requests/s by outcome",
    "latency": "latency p50 and p99 per second",
    "stock": "stock per item: available, held, paid",
    "lag": "stream lag and reaper lag",
}

Series = tuple[str, str]  # (route, outcome) of flashteam_http_request_seconds
Buckets = dict[float, float]  # upper bound (le; +Inf last) -> cumulative count
Stock = dict[str, dict[str, dict[str, int]]]  # campaign -> sku -> available/held/paid/gone
Points = list[tuple[float, float]]


@dataclass(slots=True)
class Scrape:
    """One reading of /metrics: the request histogram's cumulative buckets per (route,
    outcome), and the gauges of ``GAUGES``."""

    histograms: dict[Series, Buckets] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str) -> Scrape:
    """The request histogram and the gauges of a Prometheus exposition text.

    Raises ValueError on text that is not the exposition format."""
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        if family.name == REQUESTS:
            for sample in family.samples:
                if sample.name == f"{REQUESTS}_bucket":
                    labels = sample.labels
                    key = (labels.get("route", ""), labels.get("outcome", ""))
                    scrape.histograms.setdefault(key, {})[float(labels["le"])] = sample.value
        elif family.name in GAUGES:
            for sample in family.samples:
                if not sample.labels:
                    scrape.gauges[family.name] = sample.value
    return scrape


def increase(before: float | None, after: float) -> float:
    """How much a counter grew between two readings, as Prometheus' ``increase``: ``after -
    before``; ``after`` when it went back (its process restarted and counted from 0 again)
    or was not there before."""
    if before is None or after < before:
        return after
    return after - before


def interval_deltas(before: Scrape, after: Scrape) -> dict[Series, Buckets]:
    """Per series, how much each cumulative bucket grew between two scrapes. A series whose
    count (the +Inf bucket) went back was reset in between, and a new one starts from 0: all
    of ``after`` is new then."""
    out: dict[Series, Buckets] = {}
    for key, buckets in after.histograms.items():
        old = before.histograms.get(key)
        reset = old is None or buckets.get(INF, 0.0) < old.get(INF, 0.0)
        out[key] = {
            le: increase(None if reset or old is None else old.get(le), n)
            for le, n in buckets.items()
        }
    return out


def rates_by_outcome(
    before: Scrape, after: Scrape, seconds: float, exclude: Collection[str] = OWN_ROUTES
) -> dict[str, float]:
    """Requests per second by outcome between two scrapes ``seconds`` apart, over every route
    but ``exclude``; an outcome seen but idle in between is there with 0."""
    if seconds <= 0:
        return {}
    counts: dict[str, float] = {}
    for (route, outcome), buckets in interval_deltas(before, after).items():
        if route not in exclude:
            counts[outcome] = counts.get(outcome, 0.0) + buckets.get(INF, 0.0)
    return {outcome: n / seconds for outcome, n in counts.items()}


def merged(
    deltas: dict[Series, Buckets],
    routes: Collection[str] | None = None,
    exclude: Collection[str] = OWN_ROUTES,
) -> Buckets:
    """Several series' buckets added up into one histogram: those of ``routes`` (every route
    but ``exclude`` when None)."""
    out: Buckets = {}
    for (route, _), buckets in deltas.items():
        if (route in routes) if routes is not None else (route not in exclude):
            for le, n in buckets.items():
                out[le] = out.get(le, 0.0) + n
    return out


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q``-quantile (0 to 1) of a histogram's cumulative ``buckets``, as Prometheus'
    ``histogram_quantile`` estimates it: linear within the bucket its rank falls in (the
    first bucket starting at 0), the largest finite bound when it falls in +Inf; None when
    the histogram counted nothing."""
    total = buckets.get(INF, 0.0)
    if total <= 0:
        return None
    rank = min(1.0, max(0.0, q)) * total
    lower = below = 0.0
    for le in sorted(buckets):
        count = buckets[le]
        if count >= rank and count > below:
            if le == INF:
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return None  # not reached: the +Inf bucket holds the total


@dataclass(slots=True)
class Sample:
    """One second of the run: when (seconds since the sale opened), /metrics (None when it
    did not answer) and the stock of each campaign that answered."""

    t: float
    scrape: Scrape | None
    stock: Stock = field(default_factory=dict)


def stock_of(campaign: Any) -> dict[str, dict[str, int]]:
    """Per sku, the stock fields of a ``GET /v1/campaigns/{id}`` body."""
    return {
        str(item["sku"]): {name: int(item[name]) for name in STOCK_FIELDS}
        for item in campaign["stock"]
    }


@dataclass(slots=True)
class Timeline:
    """The samples of one run, its marks (``"sale opens"``, ``"load ends"``: seconds), and a
    running count of the requests it saw, for the progress line."""

    name: str
    campaigns: list[str]
    origin: float = field(default_factory=time.monotonic)  # monotonic time of second 0
    marks: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    requests_seen: float = 0.0  # since the first scrape, every route but OWN_ROUTES
    rate_now: float = 0.0  # requests/s between the last two scrapes

    def now(self) -> float:
        return time.monotonic() - self.origin

    def mark(self, name: str) -> None:
        self.marks[name] = round(self.now(), 3)

    def add(self, text: str | None, stock: Stock, at: float | None = None) -> Sample:
        """A sample: the /metrics ``text`` (None when unread or unparsable) read at ``at``
        (monotonic time: when its answer came, as the engine renders it once the request is
        through its queue; default now), and the stock read with it."""
        scrape = None
        if text is not None:
            try:
                scrape = parse_metrics(text)
            except (ValueError, KeyError):
                scrape = None
        t = self.now() if at is None else at - self.origin
        sample = Sample(round(t, 3), scrape, stock)
        last = self.last_scrape()
        self.samples.append(sample)
        if scrape is not None and last is not None:
            assert last.scrape is not None
            count = sum(_counts(interval_deltas(last.scrape, scrape)).values())
            self.requests_seen += count
            if sample.t > last.t:
                self.rate_now = count / (sample.t - last.t)
        return sample

    def last_scrape(self) -> Sample | None:
        return next((s for s in reversed(self.samples) if s.scrape is not None), None)

    def intervals(self) -> Iterable[tuple[float, float, dict[Series, Buckets]]]:
        """(end of the interval, its seconds, bucket increases per series) between
        consecutive scrapes."""
        scraped = [s for s in self.samples if s.scrape is not None]
        for before, after in itertools.pairwise(scraped):
            assert before.scrape is not None and after.scrape is not None
            seconds = after.t - before.t
            if seconds > 0:
                yield after.t, seconds, interval_deltas(before.scrape, after.scrape)

    def requests(self) -> dict[str, Points]:
        """Requests/s by outcome over time, outcomes by their total, most first."""
        out: dict[str, Points] = {}
        for t, seconds, deltas in self.intervals():
            for outcome, n in _counts(deltas).items():
                out.setdefault(outcome, []).append((t, n / seconds))
        totals = {outcome: sum(r for _, r in points) for outcome, points in out.items()}
        return {o: out[o] for o in sorted(out, key=lambda o: (-totals[o], o))}

    def latency(self, q: float, routes: Collection[str] | None = None) -> Points:
        """The ``q``-quantile in ms of each interval with requests, all routes (but
        OWN_ROUTES) together or only ``routes``."""
        out: Points = []
        for t, _, deltas in self.intervals():
            value = quantile(q, merged(deltas, routes))
            if value is not None:
                out.append((t, value * 1000))
        return out

    def busiest_routes(self, n: int = 4) -> list[str]:
        """The ``n`` routes that answered most requests over the run."""
        totals: dict[str, float] = {}
        for _, _, deltas in self.intervals():
            for (route, _), buckets in deltas.items():
                if route not in OWN_ROUTES:
                    totals[route] = totals.get(route, 0.0) + buckets.get(INF, 0.0)
        return sorted((r for r in totals if totals[r] > 0), key=lambda r: -totals[r])[:n]

    def gauge(self, name: str) -> Points:
        return [
            (s.t, s.scrape.gauges[name])
            for s in self.samples
            if s.scrape is not None and name in s.scrape.gauges
        ]

    def stock(self, campaign: str, sku: str, name: str) -> Points:
        return [
            (s.t, s.stock[campaign][sku][name])
            for s in self.samples
            if sku in s.stock.get(campaign, {})
        ]

    def skus(self, campaign: str) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.samples:
            seen.update(dict.fromkeys(s.stock.get(campaign, {})))
        return list(seen)

    # -- the raw samples, as <name>-timeline.json ----------------------------------------------

    def to_json(self) -> str:
        """One line per sample; the bucket bounds once (``le``), each series' cumulative
        counts in their order."""
        bounds = sorted({le for s in self._scrapes() for b in s.histograms.values() for le in b})
        head = {
            "name": self.name,
            "campaigns": self.campaigns,
            "time": "seconds since the sale opened",
            "marks": self.marks,
            "le": [_le_text(le) for le in bounds],
        }
        rows = [json.dumps(_sample_json(s, bounds), separators=(",", ":")) for s in self.samples]
        return json.dumps(head)[:-1] + ', "samples": [\n' + ",\n".join(rows) + "\n]}\n"

    @classmethod
    def from_json(cls, text: str) -> Timeline:
        data = json.loads(text)
        bounds = [float(le) for le in data["le"]]
        timeline = cls(str(data["name"]), list(data["campaigns"]), marks=dict(data["marks"]))
        for raw in data["samples"]:
            scrape = None
            if raw["requests"] is not None:
                histograms = {
                    (route, outcome): dict(zip(bounds, counts, strict=True))
                    for route, outcome, counts in raw["requests"]
                }
                scrape = Scrape(histograms, dict(raw["gauges"]))
            timeline.samples.append(Sample(float(raw["t"]), scrape, raw["stock"]))
        return timeline

    def _scrapes(self) -> list[Scrape]:
        return [s.scrape for s in self.samples if s.scrape is not None]


def _counts(deltas: dict[Series, Buckets]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for (route, outcome), buckets in deltas.items():
        if route not in OWN_ROUTES:
            counts[outcome] = counts.get(outcome, 0.0) + buckets.get(INF, 0.0)
    return counts


def _le_text(le: float) -> str:
    return "+Inf" if le == INF else repr(le)


def _compact(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _sample_json(sample: Sample, bounds: list[float]) -> dict[str, Any]:
    scrape = sample.scrape
    requests = None
    if scrape is not None:
        requests = [
            [route, outcome, [_compact(buckets.get(le, 0.0)) for le in bounds]]
            for (route, outcome), buckets in sorted(scrape.histograms.items())
        ]
    return {
        "t": sample.t,
        "requests": requests,
        "gauges": None if scrape is None else {k: _compact(v) for k, v in scrape.gauges.items()},
        "stock": sample.stock,
    }


# --------------------------------------------------------------------------- summary


def peaks(timeline: Timeline) -> list[str]:
    """The busiest second and the slowest one (p99, all routes), for the printed summary."""
    totals: dict[float, float] = {}
    for points in timeline.requests().values():
        for t, rate in points:
            totals[t] = totals.get(t, 0.0) + rate
    p99 = timeline.latency(0.99)
    if not totals or not p99:
        return [f"  {len(timeline.samples)} samples, too few to tell rates apart"]
    busiest = max(totals, key=lambda t: totals[t])
    slowest = max(p99, key=lambda point: point[1])
    return [
        f"  peak {totals[busiest]:,.0f} requests/s at {busiest:.0f} s; worst p99 of a second "
        f"{slowest[1]:,.0f} ms at {slowest[0]:.0f} s (all routes, from the histogram's buckets)"
    ]


def alert_thresholds(path: Path = ALERTS) -> dict[str, float]:
    """``metric > N`` of the alerting rules on the two lags, by metric name."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    found = re.findall(r"\((flashteam_(?:stream|reaper)_lag_seconds)\)\s*>\s*([0-9.]+)", text)
    return {name: float(value) for name, value in found}


# --------------------------------------------------------------------------- charts

#: Colors of the outcomes a sale is read by (5xx in reds); others take PALETTE in turn.
OUTCOME_COLORS = {
    "ok": "tab:green",
    "sold_out": "tab:orange",
    "internal": "darkred",
    "unavailable": "tab:red",
    "overloaded": "salmon",
}
PALETTE = ("tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "gold")
FIELD_STYLES: dict[str, Any] = {"available": "-", "held": "--", "paid": ":"}
MAX_OUTCOMES = 8  # lines of the requests chart; the rest are summed as "other"


def draw(timeline: Timeline, prefix: Path) -> dict[str, Path] | None:
    """The four charts as ``<prefix>-timeline-<kind>.png`` (kinds of ``CHARTS``); None when
    matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    drawers: dict[str, Callable[[Any, Timeline], None]] = {
        "requests": _requests_chart,
        "latency": _latency_chart,
        "stock": _stock_chart,
        "lag": _lag_chart,
    }
    heights = {"requests": 4.5, "latency": 6.5, "stock": 3.2, "lag": 4.0}
    out = {}
    for kind, drawer in drawers.items():
        rows = max(1, len(timeline.campaigns)) if kind == "stock" else 1
        fig = Figure(figsize=(11, heights[kind] * (rows if kind == "stock" else 1)))
        drawer(fig, timeline)
        fig.tight_layout()
        path = Path(f"{prefix}-timeline-{kind}.png")
        fig.savefig(path, dpi=100)
        out[kind] = path
    return out


def _marks(ax: Any, timeline: Timeline, labels: bool = True) -> None:
    """A dotted vertical line per mark; with ``labels``, their names on a top axis (marks
    closer than 8% of the run share one label)."""
    marks = sorted(timeline.marks.items(), key=lambda item: item[1])
    for _, t in marks:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    if not labels or not marks:
        return
    times = [s.t for s in timeline.samples] + [t for _, t in marks]
    close = 0.08 * (max(times) - min(times))
    groups: list[tuple[float, list[str]]] = []
    for name, t in marks:
        if groups and t - groups[-1][0] <= close:
            groups[-1][1].append(name)
        else:
            groups.append((t, [name]))
    top = ax.secondary_xaxis("top")
    top.set_xticks([t for t, _ in groups], labels=[" / ".join(names) for _, names in groups])
    top.tick_params(labelsize=7, labelcolor="dimgrey", length=2)


def _axes(
    ax: Any, timeline: Timeline, title: str, ylabel: str, xlabel: bool = True, marks: bool = True
) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel("seconds since the sale opened")
    ax.grid(True, alpha=0.3)
    _marks(ax, timeline, labels=marks)


def _legend(ax: Any, **options: Any) -> None:
    """The legend right of the axes, off the lines."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), **options)


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} sampled", transform=ax.transAxes, ha="center", va="center")


def _xy(points: Points) -> tuple[list[float], list[float]]:
    return [t for t, _ in points], [v for _, v in points]


def _requests_chart(fig: Any, timeline: Timeline) -> None:
    ax = fig.subplots()
    series = timeline.requests()
    names = list(series)
    shown, rest = names[:MAX_OUTCOMES], names[MAX_OUTCOMES:]
    total: dict[float, float] = {}
    for outcome in names:
        for t, rate in series[outcome]:
            total[t] = total.get(t, 0.0) + rate
    if total:
        ax.plot(*_xy(sorted(total.items())), color="black", linewidth=1, label="all")
    others = iter(PALETTE)
    for outcome in shown:
        count = _total(series[outcome], timeline)
        color = OUTCOME_COLORS.get(outcome) or next(others, "grey")
        ax.plot(
            *_xy(series[outcome]),
            color=color,
            linewidth=1.5,
            label=f"{outcome} ({count:,.0f})",
        )
    if rest:
        other: dict[float, float] = {}
        for outcome in rest:
            for t, rate in series[outcome]:
                other[t] = other.get(t, 0.0) + rate
        ax.plot(*_xy(sorted(other.items())), color="grey", label=f"{len(rest)} more outcomes")
    if not series:
        _empty(ax, "requests")
    ax.set_ylim(bottom=0)
    _axes(
        ax,
        timeline,
        f"{timeline.name}: requests per second by outcome, every route but /metrics",
        "requests/s",
    )
    if series:
        _legend(ax, title="outcome (requests)", title_fontsize=8)
    ax.text(
        1.01,
        0.0,
        f"ok includes the sampler's own\n{len(timeline.campaigns)} campaign reads a second",
        transform=ax.transAxes,
        fontsize=7,
        color="dimgrey",
        va="bottom",
    )


def _total(points: Points, timeline: Timeline) -> float:
    """Requests in a rate series: each interval's rate times its length."""
    ends = {t: seconds for t, seconds, _ in timeline.intervals()}
    return sum(rate * ends.get(t, 0.0) for t, rate in points)


def _latency_chart(fig: Any, timeline: Timeline) -> None:
    top, bottom = fig.subplots(2, 1, sharex=True)
    p50, p99 = timeline.latency(0.5), timeline.latency(0.99)
    if p99:
        top.plot(*_xy(p99), color="tab:red", linewidth=1.5, label="p99")
        top.plot(*_xy(p50), color="tab:blue", linewidth=1.5, label="p50")
        top.set_yscale("log")
        _legend(top)
    else:
        _empty(top, "requests")
    _axes(
        top,
        timeline,
        f"{timeline.name}: latency of each second, all routes (from the histogram's buckets)",
        "ms (log)",
        xlabel=False,
    )
    routes = timeline.busiest_routes()
    for i, route in enumerate(routes):
        points = timeline.latency(0.99, [route])
        bottom.plot(*_xy(points), color=f"C{i}", linewidth=1.2, label=route)
    if routes:
        bottom.set_yscale("log")
        _legend(bottom)
    else:
        _empty(bottom, "requests")
    _axes(bottom, timeline, "p99 of the busiest routes", "ms (log)", marks=False)


def _stock_chart(fig: Any, timeline: Timeline) -> None:
    from matplotlib.lines import Line2D

    campaigns = timeline.campaigns or [""]
    axes = fig.subplots(len(campaigns), 1, sharex=True, squeeze=False)[:, 0]
    for n, (ax, campaign) in enumerate(zip(axes, campaigns, strict=True)):
        skus = timeline.skus(campaign)
        for i, sku in enumerate(skus):
            for name, style in FIELD_STYLES.items():
                ax.plot(*_xy(timeline.stock(campaign, sku, name)), linestyle=style, color=f"C{i}")
        if not skus:
            _empty(ax, "stock")
        ax.set_ylim(bottom=0)
        last = n == len(campaigns) - 1
        _axes(ax, timeline, f"{campaign}: units per item", "units", xlabel=last, marks=n == 0)
        handles = [Line2D([], [], color=f"C{i}", label=sku) for i, sku in enumerate(skus)]
        handles += [
            Line2D([], [], color="black", linestyle=style, label=name)
            for name, style in FIELD_STYLES.items()
        ]
        if skus:
            _legend(ax, handles=handles)


def _lag_chart(fig: Any, timeline: Timeline) -> None:
    ax = fig.subplots()
    colors = {STREAM_LAG: "tab:blue", REAPER_LAG: "tab:purple"}
    labels = {STREAM_LAG: "stream lag (oldest unflushed event)", REAPER_LAG: "reaper lag"}
    highest = 0.0
    for name, color in colors.items():
        points = timeline.gauge(name)
        if points:
            ax.plot(*_xy(points), color=color, linewidth=1.5, label=labels[name])
            highest = max(highest, max(v for _, v in points))
    top = max(highest * 1.3, 0.25)
    notes = []
    for name, threshold in alert_thresholds().items():
        label = "stream" if name == STREAM_LAG else "reaper"
        if threshold <= top * 1.5:
            top = max(top, threshold * 1.15)
            ax.axhline(threshold, color=colors[name], linestyle="--", linewidth=1)
            notes.append(f"{label} lag > {threshold:g} s (dashed)")
        else:
            notes.append(f"{label} lag > {threshold:g} s (above this scale)")
    ax.set_ylim(0, top)
    if notes:
        ax.text(
            0.01,
            0.97,
            "alerts (deploy/prometheus/alerts.yml): " + ", ".join(notes),
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="dimgrey",
        )
    unflushed = timeline.gauge(UNFLUSHED)
    if unflushed:
        right = ax.twinx()
        right.plot(*_xy(unflushed), color="grey", linewidth=0.8, alpha=0.7, label="unflushed")
        right.set_ylabel("unflushed outbox entries", color="grey")
        right.set_ylim(bottom=0, top=max(max(v for _, v in unflushed) * 1.3, 10))
    if not highest and not timeline.gauge(STREAM_LAG):
        _empty(ax, "lag")
    _axes(ax, timeline, f"{timeline.name}: stream lag and reaper lag (/metrics)", "seconds")
    handles, names = ax.get_legend_handles_labels()
    if unflushed:
        handles.append(right.get_lines()[0])
        names.append("unflushed outbox entries (right)")
    if handles:
        ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.08, 1.0))


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtests.timeline <name>-timeline.json``: draw the charts again from the
    raw samples, next to the file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].endswith("-timeline.json"):
        print("usage: python -m loadtests.timeline <reports>/<name>-timeline.json", file=sys.stderr)
        return 2
    source = Path(args[0])
    charts = draw(
        Timeline.from_json(source.read_text()), Path(str(source)[: -len("-timeline.json")])
    )
    if charts is None:
        print("matplotlib is not installed: no charts", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in charts.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
