"""T9: the front door under a spike, on the default `flashteam run` stack (2 API workers).

Reservations first at 64 connections (the peak: what the stack serves when it is not
overloaded), then at 4,000 connections, each closed loop (a connection sends its next
reservation as soon as it has an answer, or after ``Retry-After`` when it was shed with 503
``overloaded``, as the storefront gateway is asked to) while a stream of payments
(``PAY_PER_S`` a second, for orders reserved beforehand) runs alongside. Reported: the
goodput (reservations answered 201 per second) at 4,000 connections over the peak's, the p99
of the reservations answered 201 and of the shed answers, and the p99 of the payments. The
generators share the machine with the stack: on a 2-core machine the 4,000 connections' own
client costs CPU the server would otherwise have; timings are reported, never asserted;
correctness is (every answer 201 or 503, every payment 200 or 503, the stock adds up).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench import http_stacks as hs
from bench.overload_load import Outcome, in_process
from bench.report import RESULTS, report
from bench.results import load_results
from bench.targets import DEFAULT_STACK, OVERLOAD_CONNECTIONS, PEAK_CONNECTIONS, verdicts

SECONDS = 10.0
PAY_PER_S = 100
PAY_DELAY = 2.0  # seconds into the overload before the payments start


@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_overload_sheds_and_pays(tmp_path: Path) -> None:
    (config,) = (c for c in hs.CONFIGS if c.name == DEFAULT_STACK)
    with hs.stack(config, tmp_path / "t9") as engine:
        campaign = f"t9-{uuid.uuid4().hex[:10]}"
        hs.create_campaign(engine.url, campaign)
        orders = _reserve_for_payers(engine.url, campaign, int(PAY_PER_S * (SECONDS - PAY_DELAY)))
        peak = in_process("reserve", engine.url, campaign, hs.HOT, PEAK_CONNECTIONS, SECONDS)
        with ThreadPoolExecutor(2) as pool:
            spike = pool.submit(
                in_process, "reserve", engine.url, campaign, hs.HOT, OVERLOAD_CONNECTIONS, SECONDS
            )
            time.sleep(PAY_DELAY)
            paid = pool.submit(in_process, "pay", engine.url, orders, PAY_PER_S).result()
            overload = spike.result()
        assert hs.running(engine)
        for outcome in (peak, overload):
            assert set(outcome.latencies) <= {201, 503}, outcome.latencies.keys()
        assert set(paid.latencies) <= {200, 503}, paid.latencies.keys()
        reserved = len(orders) + peak.count(201) + overload.count(201)
        item = hs.stock(engine.url, campaign)[hs.HOT]
        assert reserved <= item["held"] + item["paid"], (reserved, item)

    rows = [
        _row("peak", PEAK_CONNECTIONS, peak, None, peak),
        _row("overload", OVERLOAD_CONNECTIONS, overload, paid, peak),
    ]
    report(
        "t9-overload",
        f"T9 overload: reserve at {PEAK_CONNECTIONS} connections (the peak) and at "
        f"{OVERLOAD_CONNECTIONS:,}, closed loop, with {PAY_PER_S} payments/s during the "
        "overload; the default `flashteam run` stack, 2 API workers",
        rows,
    )
    for found in verdicts(load_results(RESULTS)):
        if found.target.id == "T9":
            print(f"{found.target.name}: {found.verdict}: {found.measured} ({found.baseline})")


def _reserve_for_payers(url: str, campaign: str, count: int) -> list[tuple[str, str]]:
    """``count`` held orders, each of its own shopper, for the payment stream."""
    orders: list[tuple[str, str]] = []
    for start in range(0, count, 256):
        items = [
            {"op": "reserve", "campaign_id": campaign, "user_id": f"payer-{n}", "sku": hs.HOT}
            | {"qty": 1, "idempotency_key": f"pay-{n}"}
            for n in range(start, min(count, start + 256))
        ]
        status, answer = hs.call(url, "POST", "/v1/batch", {"requests": items})
        assert status == 200, answer
        for item, result in zip(items, answer["results"], strict=True):
            assert result["status"] == 201, result
            orders.append((result["body"]["order_id"], str(item["user_id"])))
    return orders


def _row(
    phase: str, connections: int, reserve: Outcome, paid: Outcome | None, peak: Outcome
) -> dict[str, Any]:
    return {
        "phase": phase,
        "connections": connections,
        "reserved_per_s": reserve.per_s(201),
        "vs_peak": reserve.per_s(201) / peak.per_s(201) if peak.per_s(201) else 0.0,
        "reserve_p99_ms": reserve.p99_ms(201),
        "shed_per_s": reserve.per_s(503),
        "shed_p99_ms": reserve.p99_ms(503) if reserve.count(503) else "",
        "pay_per_s": paid.per_s(200) if paid else "",
        "pay_shed": paid.count(503) if paid else "",
        "pay_p99_ms": paid.p99_ms(200, 503) if paid else "",
        "socket_errors": reserve.socket_errors + (paid.socket_errors if paid else 0),
    }
