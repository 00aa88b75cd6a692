"""Monitoring as code (deploy/, deploy/README.md): the Prometheus alerting rules, their unit
tests, the example Prometheus configuration, the Grafana dashboard and its provisioning.

What is proven:

- ``promtool check rules`` accepts deploy/prometheus/alerts.yml, ``promtool check config``
  accepts deploy/prometheus/prometheus.yml, and ``promtool test rules`` passes
  deploy/prometheus/alerts_test.yml (each alert fires on a planted series and stays silent
  below its threshold, on a blip shorter than its ``for:`` or on the wrong labels);
- those unit tests test something: copies of the rules (in tmp_path) with the stream-lag
  threshold raised, or lowered, make them fail, and so does each rule neutered in turn;
- every rule has a ``for:``, a page or ticket severity, a summary and a description pointing
  to a section of docs/ that exists; the 5xx rules count exactly the outcomes the HTTP
  contract answers with a 5xx (``internal``: 500, ``unavailable``: 503, engine/api/app.py);
- the dashboard is valid JSON with unique panel ids, non-overlapping panels, a ``datasource``
  variable that every panel and target uses (no data source uid written in), an expr in
  every target, and PromQL that promtool parses; the provisioning files load it;
- every metric a rule or a panel uses is exported by a running engine (``flashteam serve``
  with 2 workers, after requests and script calls gave the histograms samples), and every
  flashteam metric the engine exports has a panel.

promtool comes from Debian's ``prometheus`` package (``make promtool``, a prerequisite of
``make test``); without it these tests fail, they are not skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from engine import errors
from engine.api.app import STATUS
from engine.local.launcher import ApiServer
from testkit.helpers import eventually
from tests.test_api import GW, SKU, new_flash, ok, pay, reserve
from tests.test_docs import DOC_REF, bad_link

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "flashteam.json"
PROVISIONING = GRAFANA / "provisioning"

ALERTS = {
    "FlashteamDown",
    "FlashteamRedisDown",
    "FlashteamSQLDown",
    "FlashteamStreamLagHigh",
    "FlashteamReaperLagHigh",
    "FlashteamHTTP5xx",
    "FlashteamHTTPUnavailable",
    "FlashteamShedding",
    "FlashteamDeadLetters",
    "FlashteamCampaignFenced",
    "FlashteamRecoveryFailures",
    "FlashteamCampaignRepaired",
    "FlashteamArchiveRefused",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
STREAM_LAG = "(flashteam_stream_lag_seconds) > 2"
NEVER = "vector(0) > 1"  # valid PromQL that never returns a sample

Json = dict[str, Any]


# --------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run `make promtool` (as root it installs Debian's "
            "prometheus package; else `sudo apt-get install prometheus`). The monitoring "
            "tests need it and are never skipped."
        )
    return path


def run(promtool: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"promtool exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


def assert_ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, output(done)


# --------------------------------------------------------------------------- the files


@cache
def rules() -> tuple[Json, ...]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    (group,) = document["groups"]
    assert group["name"] == "flashteam"
    return tuple(group["rules"])


def rule(name: str) -> Json:
    (found,) = (r for r in rules() if r["alert"] == name)
    return found


@cache
def dashboard() -> Json:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def panels() -> list[Json]:
    """Every panel, those nested in collapsed rows too."""
    found: list[Json] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def planted(tmp_path: Path, document: Json | str) -> Path:
    """A copy of the rule tests in tmp_path next to these rules; returns the test file."""
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    (tmp_path / "alerts.yml").write_text(text, encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yml")
    return tmp_path / "alerts_test.yml"


# --------------------------------------------------------------------------- PromQL names

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NAME = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan"}
)
HISTOGRAM_SUFFIX = re.compile(r"_(?:bucket|count|sum)$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values query) selects: not
    its functions, keywords, label names, label values, ranges or Grafana variables."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    label_values = re.fullmatch(r"\s*label_values\(\s*([\w:]+)\s*,\s*\w+\s*\)\s*", text)
    if label_values:
        return {label_values.group(1)}
    return {
        m.group(1)
        for m in _NAME.finditer(text)
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS
    }


def test_metric_names_finds_only_metrics() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (route, le) (rate(flashteam_http_request_seconds_bucket"
        '{job=~"$job", route="POST /v1/c/{campaign_id}/orders"}[$__rate_interval]))) '
        "/ on (job) group_left max without (instance) (flashteam_x offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"flashteam_http_request_seconds_bucket", "flashteam_x"}
    assert metric_names("label_values(flashteam_redis_up, job)") == {"flashteam_redis_up"}
    assert metric_names('up{job="flashteam"} == 0 and vector(1)') == {"up"}


# --------------------------------------------------------------------------- the rules


def test_promtool_checks_the_rules(promtool: str) -> None:
    done = run(promtool, "check", "rules", RULES)
    assert_ok(done)
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, output(done)


def test_promtool_checks_the_prometheus_config(promtool: str) -> None:
    assert_ok(run(promtool, "check", "config", CONFIG))
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "flashteam"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    done = run(promtool, "test", "rules", RULE_TESTS)
    assert_ok(done)
    assert "SUCCESS" in done.stdout, output(done)


@pytest.mark.parametrize(
    ("threshold", "failing"),
    [("10", "stream lag of 5 s fires"), ("1", "stream lag at or below 2 s")],
    ids=["raised: the planted lag of 5 s no longer fires", "lowered: 1.5 s now fires"],
)
def test_a_moved_stream_lag_threshold_fails_the_unit_tests(
    promtool: str, tmp_path: Path, threshold: str, failing: str
) -> None:
    """The planted failure: the same tests against rules whose threshold moved must fail,
    naming the test group that caught it."""
    text = RULES.read_text(encoding="utf-8")
    assert text.count(STREAM_LAG) == 1
    moved = text.replace(STREAM_LAG, STREAM_LAG.replace("> 2", f"> {threshold}"))
    done = run(promtool, "test", "rules", planted(tmp_path, moved), cwd=tmp_path)
    assert done.returncode != 0, output(done)
    assert "FlashteamStreamLagHigh" in done.stdout + done.stderr, output(done)
    assert failing in done.stdout + done.stderr, output(done)


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_each_alert_has_a_test_that_sees_it_fire(promtool: str, tmp_path: Path, alert: str) -> None:
    """With this one rule made never to fire, the unit tests fail on it."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    (target,) = (r for r in document["groups"][0]["rules"] if r["alert"] == alert)
    target["expr"] = NEVER
    done = run(promtool, "test", "rules", planted(tmp_path, document), cwd=tmp_path)
    assert done.returncode != 0, output(done)
    assert f"alertname: {alert}," in done.stdout + done.stderr, output(done)


def test_each_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    assert fires == ALERTS, f"no firing test for {ALERTS - fires}"
    assert silent == ALERTS, f"no silent test for {ALERTS - silent}"


def test_every_rule_tells_the_sre_what_to_do() -> None:
    assert {r["alert"] for r in rules()} == ALERTS
    for r in rules():
        name = r["alert"]
        assert re.fullmatch(r"\d+[smh]", r.get("for", "")), f"{name}: no for:"
        assert r["labels"]["severity"] in {"page", "ticket"}, name
        annotations = r["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        assert annotations["summary"].strip() and len(annotations["description"]) > 100, name
        links = DOC_REF.findall(annotations["description"])
        assert links, f"{name}: its description points to no section of docs/"
        for page, anchor in links:
            assert anchor, f"{name}: docs/{page} without a section"
            assert bad_link(page, anchor) is None, f"{name}: {bad_link(page, anchor)}"


def test_deploy_readme_lists_every_alert_and_its_links_resolve() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert set(re.findall(r"^\| (Flashteam\w+) \|", text, re.M)) == ALERTS
    links = re.findall(r"\]\(\.\./docs/([\w-]+\.md)(?:#([\w-]+))?\)", text)
    assert links
    for page, anchor in links:
        assert bad_link(page, anchor or None) is None, bad_link(page, anchor or None)


def test_the_5xx_rules_count_exactly_the_5xx_outcomes() -> None:
    """The HTTP contract answers 500 only for ``internal`` (an exception no handler expected)
    and 503 only for ``unavailable``, ``payment_pending`` and ``overloaded`` (shed by admission
    control); the rules count those outcomes and no others."""
    fivexx = {code for code, status in STATUS.items() if status >= 500}
    assert errors.EngineError.code == "internal" and "internal" not in STATUS  # -> 500
    assert fivexx == {errors.Unavailable.code, errors.PaymentPending.code, "overloaded"}
    assert fivexx == {"unavailable", "payment_pending", "overloaded"}
    outcomes = {
        value
        for r in rules()
        for value in re.findall(r'outcome\s*=~?\s*"([^"]*)"', r["expr"])
        if "flashteam_http_request_seconds" in r["expr"]
    }
    assert outcomes == {"internal", "unavailable|payment_pending", "overloaded"}
    assert 'outcome="internal"' in rule("FlashteamHTTP5xx")["expr"]
    assert 'outcome=~"unavailable|payment_pending"' in rule("FlashteamHTTPUnavailable")["expr"]
    assert 'outcome="overloaded"' in rule("FlashteamShedding")["expr"]
    assert rule("FlashteamHTTP5xx")["labels"]["severity"] == "page"
    assert rule("FlashteamHTTPUnavailable")["labels"]["severity"] == "ticket"
    assert rule("FlashteamShedding")["labels"]["severity"] == "ticket"


# --------------------------------------------------------------------------- the dashboard


def walk(node: object) -> Iterator[Json]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_dashboard_is_provisioning_ready() -> None:
    board = dashboard()
    assert board["uid"] == "flashteam" and board["title"] == "flashteam"
    assert 36 <= board["schemaVersion"] <= 41
    assert board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    # No data source is named by uid: every reference goes through the variable.
    for node in walk(board):
        if "datasource" in node and isinstance(node["datasource"], dict):
            assert node["datasource"] == DATASOURCE, node


def test_dashboard_panels() -> None:
    everything = panels()
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for panel in everything:
        title = panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = title
        if panel["type"] == "row":
            assert "targets" not in panel, title
            continue
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"{title}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target.get("expr", "").strip(), f"{title}: a target without expr"
    titles = " | ".join(p["title"] for p in everything).lower()
    for wanted in ("requests/s", "p50", "p99", "5xx", "script", "stream lag", "reaper lag"):
        assert wanted in titles, f"no panel for {wanted}"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, parses as a recording rule."""
    records = []
    for n, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", "flashteam")
        assert "$" not in concrete, f"an unknown variable in {expr}"
        records.append({"record": f"dashboard:query_{n}", "expr": concrete})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = run(promtool, "check", "rules", path)
    assert_ok(done)
    assert f"SUCCESS: {len(records)} rules found" in done.stdout, output(done)


def test_grafana_provisioning_loads_the_dashboard() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "flashteam.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path == "${FLASHTEAM_DASHBOARDS}"
    # deploy/README.md: FLASHTEAM_DASHBOARDS is deploy/grafana/dashboards.
    loaded = Path(path.replace("${FLASHTEAM_DASHBOARDS}", str(GRAFANA / "dashboards")))
    assert sorted(p.name for p in loaded.glob("*.json")) == ["flashteam.json"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "${PROMETHEUS_URL}"


# --------------------------------------------------------------------------- a running engine


def used_metrics() -> dict[str, str]:
    """Every metric name a rule or a dashboard query uses -> where (``up`` is Prometheus's)."""
    used: dict[str, str] = {}
    for r in rules():
        for name in metric_names(r["expr"]):
            used.setdefault(name, f"rule {r['alert']}")
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, f"dashboard query {expr}")
    used.pop("up", None)
    return used


def exported_types(text: str) -> dict[str, str]:
    """Metric name -> type, from the ``# TYPE`` lines of a scrape."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def samples(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][\w:]*)[{ ]", text, re.M)}


async def test_every_metric_used_is_exported_by_a_running_engine(api: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=15, trust_env=False) as client:
        ok(await client.get("/healthz"))
        assert (await client.get("/v1/no-such-route")).status_code == 404
        campaign_id = await new_flash(client, "monitoring")
        held = ok(await reserve(client, campaign_id, "shopper-1", sku=SKU), 201)
        ok(await pay(client, held["order_id"], "shopper-1"))  # a durable payment's histogram
        ok(await client.get(f"/v1/campaigns/{campaign_id}", headers=GW))

        async def scraped() -> str | None:
            """/metrics once the worker that paid has added its observations (every 0.1 s)."""
            response = await client.get("/metrics")
            assert response.status_code == 200
            return (
                response.text
                if "flashteam_payment_commit_seconds_bucket" in response.text
                else None
            )

        text = await eventually(scraped, 5, what="the payment's histogram on /metrics")
    types = exported_types(text)
    present = samples(text)
    assert {
        "flashteam_http_request_seconds_bucket",
        "flashteam_script_seconds_bucket",
        "flashteam_payment_commit_seconds_bucket",
    } <= present

    missing = []
    for name, where in sorted(used_metrics().items()):
        base = HISTOGRAM_SUFFIX.sub("", name)
        if base != name and types.get(base) == "histogram":
            assert name in present, f"{name} ({where}): a histogram without that series"
        elif types.get(name) not in {"gauge", "counter"}:
            missing.append(f"{name} (used by {where})")
    assert not missing, "not exported by the engine's /metrics:\n" + "\n".join(missing)

    exported = {name for name in types if name.startswith("flashteam_")}
    shown = {HISTOGRAM_SUFFIX.sub("", m) for e in dashboard_exprs() for m in metric_names(e)}
    assert exported - shown == set(), f"exported but on no dashboard panel: {exported - shown}"
