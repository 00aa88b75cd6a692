"""The live sale page (``GET /live``, engine/api/live.py) in a real browser: Debian's headless
Chromium driven by Selenium through chromedriver.

The whole `flashteam run` stack starts (private redis-server, SQLite, two API workers, the
flush worker, the reaper). The page is opened, refuses a wrong token, takes the admin token,
and while a short sale runs (a flash item selling out to twice as many shoppers as units, most
of them paying; a team campaign quick-joined and paid) its figures move. Once the sale has
settled, every figure the page shows for a campaign (each item's stock and KPIs, each
rejection reason, each team figure) is the one ``GET /v1/campaigns/{id}/stats`` answers, as
value and as displayed text. The token never appears in a URL. Screenshots are saved in the
middle of the sale and at its end; the first is copied to ``FLASHTEAM_LIVE_SCREENSHOT`` when
that is set (how docs/live.png is made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from engine.local.launcher import TEST_ADMIN_TOKEN, TEST_GATEWAY_TOKEN, LocalEngine
from engine.local.process import free_port
from engine.settings import Settings
from testkit.factories import campaign_json, flash_campaign, team_campaign
from testkit.helpers import eventually

GW = {"Authorization": f"Bearer {TEST_GATEWAY_TOKEN}"}
AD = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
FLASH, TEAM, SKU = "live-flash", "live-team", "sku-1"
STOCK = 150
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# What the page shows of a campaign, by its data-k suffix, and how it writes each kind.
ITEM_FIELDS = {
    "initial": "int",
    "available": "int",
    "held": "int",
    "paid_units": "int",
    "orders": "int",
    "paid_orders": "int",
    "gmv": "money",
    "hold_to_paid": "pct",
    "sell_through": "pct",
    "time_to_sell_out_s": "secs",
}
TEAM_FIELDS = {
    "created": "int",
    "pending": "int",
    "open": "int",
    "succeeded": "int",
    "failed": "int",
    "dissolved": "int",
    "success_rate": "pct",
    "mean_time_to_fill_s": "secs",
}


def shown(value: Any, kind: str) -> str:
    """What the page writes for ``value`` (live.js ``format``)."""
    if value is None:
        return "\N{EN DASH}"
    if kind == "pct":
        return f"{value * 100:.1f}%"
    if kind == "secs":
        return f"{value:.1f} s"
    if kind == "money":
        return f"{value / 100:,.2f}"
    return f"{round(value):,}"


@pytest.fixture
def engine_stack(tmp_path: Path) -> Iterator[LocalEngine]:
    """`flashteam run`'s processes on a private redis-server and SQLite."""
    settings = Settings(
        data_dir=tmp_path / "data",
        gateway_token=TEST_GATEWAY_TOKEN,
        admin_token=TEST_ADMIN_TOKEN,
        rate_limit=0,
    )
    with LocalEngine(settings, port=free_port(), log=tmp_path / "engine.log") as local:
        yield local


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium (Debian's package), no network but this machine's."""
    for program in (CHROMIUM, CHROMEDRIVER):
        assert Path(program).exists(), (
            f"{program} is missing: `make test` installs Debian's chromium and chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1250",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def figures(driver: webdriver.Chrome, prefix: str) -> dict[str, tuple[str, str]]:
    """Every figure on the page whose data-k starts with ``prefix``: key -> (value, text)."""
    found: dict[str, tuple[str, str]] = driver.execute_script(
        "const out = {};"
        "for (const e of document.querySelectorAll('[data-k]'))"
        "  if (e.dataset.k.startsWith(arguments[0]))"
        "    out[e.dataset.k] = [e.dataset.v, e.textContent];"
        "return out;",
        prefix,
    )
    return {k: (v[0], v[1]) for k, v in found.items()}


def expected(stats: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """What the page must show for a campaign whose stats are ``stats``."""
    cid = stats["campaign_id"]
    out: dict[str, tuple[str, str]] = {}
    for item in stats["items"]:
        for name, kind in ITEM_FIELDS.items():
            value = item[name]
            out[f"c:{cid}:i:{item['sku']}:{name}"] = (_raw(value), shown(value, kind))
    for code, count in stats["rejections"].items():
        out[f"c:{cid}:rej:{code}"] = (_raw(count), shown(count, "int"))
    for name, kind in TEAM_FIELDS.items() if stats["teams"] else ():
        value = stats["teams"][name]
        out[f"c:{cid}:teams:{name}"] = (_raw(value), shown(value, kind))
    return out


def _raw(value: Any) -> str:
    """A number as JavaScript's String() writes it (data-v)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


async def create(client: httpx.AsyncClient) -> None:
    now = datetime.now(UTC)
    shape: dict[str, Any] = {"stock": STOCK, "limit": 1, "hold_seconds": 600}
    for campaign in (
        flash_campaign(now, FLASH, **shape),
        team_campaign(now, TEAM, team_size=3, team_ttl_seconds=3600, **shape),
    ):
        answer = await client.post("/v1/campaigns", json=campaign_json(campaign), headers=AD)
        assert answer.status_code == 201, answer.text


async def sale(client: httpx.AsyncClient, halfway: Callable[[], object]) -> None:
    """Twice as many flash shoppers as units, in waves, 4 in 5 paying their hold; 90 team
    shoppers quick-joining, 4 in 5 paying; ``halfway`` is called after the fourth wave."""

    async def flash_shopper(n: int) -> None:
        body = {"user_id": f"f{n}", "sku": SKU, "qty": 1, "idempotency_key": "k"}
        held = await client.post(f"/v1/campaigns/{FLASH}/orders", json=body, headers=GW)
        if held.status_code == 201 and n % 5:
            pay = {"user_id": f"f{n}", "payment_ref": f"p{n}"}
            paid = await client.post(
                f"/v1/orders/{held.json()['order_id']}/pay", json=pay, headers=GW
            )
            assert paid.status_code == 200, paid.text

    async def team_shopper(n: int) -> None:
        body = {"user_id": f"t{n}", "sku": SKU, "idempotency_key": "k"}
        seat = await client.post(f"/v1/campaigns/{TEAM}/teams/quick-join", json=body, headers=GW)
        assert seat.status_code == 201, seat.text
        if n % 5:
            pay = {"user_id": f"t{n}", "payment_ref": f"p{n}"}
            paid = await client.post(
                f"/v1/orders/{seat.json()['order_id']}/pay", json=pay, headers=GW
            )
            assert paid.status_code == 200, paid.text

    for wave in range(10):
        await asyncio.gather(*(flash_shopper(n) for n in range(wave * 30, wave * 30 + 30)))
        await asyncio.gather(*(team_shopper(n) for n in range(wave * 9, wave * 9 + 9)))
        await asyncio.sleep(0.4)  # a sale the page can watch move, poll after poll
        if wave == 3:
            halfway()


async def test_the_live_page_shows_the_sale_as_the_stats_endpoint_does(
    engine_stack: LocalEngine, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    url = engine_stack.url
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
        await create(client)
        browser.get(f"{url}/live")
        token = browser.find_element(By.ID, "token")
        token.send_keys(TEST_GATEWAY_TOKEN)  # not the admin token: refused
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        error = browser.find_element(By.ID, "login-error")

        async def refused() -> bool:
            return bool(error.is_displayed())

        await eventually(refused, 10, what="the refusal shown")
        assert error.text == "That is not the admin token."

        browser.find_element(By.ID, "token").send_keys(TEST_ADMIN_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        key = f"c:{FLASH}:i:{SKU}:available"

        async def polled() -> bool:
            return key in figures(browser, key)

        await eventually(polled, 15, what="the first poll")

        seen: set[str] = set()

        async def watch() -> None:
            while True:
                seen.update(v for v, _ in figures(browser, key).values())
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        during = tmp_path / "live-during-the-sale.png"
        try:
            await sale(client, lambda: browser.save_screenshot(str(during)))
        finally:
            watcher.cancel()
        target = os.environ.get("FLASHTEAM_LIVE_SCREENSHOT")
        if target:  # docs/live.png: the page in the middle of the sale
            shutil.copyfile(during, target)
        assert len(seen) >= 3, f"the available stock on the page did not move: {seen}"

        async def settled() -> bool:
            """The page shows, for both campaigns, exactly what /stats answers now."""
            for cid in (FLASH, TEAM):
                answer = await client.get(f"/v1/campaigns/{cid}/stats", headers=GW)
                stats = answer.json()
                if stats["unflushed_events"]:
                    return False
                want = expected(stats)
                got = figures(browser, f"c:{cid}:")
                if {k: got.get(k) for k in want} != want:
                    return False
            return True

        try:
            await eventually(settled, 20, what="the page to show what /stats answers")
        finally:
            browser.save_screenshot(str(tmp_path / "live.png"))
        flash_stats = (await client.get(f"/v1/campaigns/{FLASH}/stats", headers=GW)).json()
        (item,) = flash_stats["items"]
        assert item["available"] == 0 and item["paid_units"] > 0
        assert flash_stats["rejections"].get("sold_out", 0) > 0
        engine = figures(browser, "e:")
        assert float(engine["e:route:POST /v1/campaigns/{campaign_id}/orders:count"][0]) >= 300
        assert "e:route:POST /v1/campaigns/{campaign_id}/orders:shed_rps" in engine  # 503s
        assert TEST_ADMIN_TOKEN not in browser.current_url
        assert (tmp_path / "live.png").stat().st_size > 10_000 < during.stat().st_size
