"""Locust scenarios for a flash sale and a team sale against the flashteam HTTP API.

Four kinds of visitor, in the proportions of ``--mix``:

- ``FlashShopper`` (flash): reserves one unit of a random item of the flash campaign, then
  pays (``--pay-rate``), cancels (``--cancel-rate``) or walks away and lets the hold expire.
- ``TeamLeader`` (leader): opens a team on the team campaign, pays (the team opens) and shares
  it: looks at the share view and hands the team to joiners in the same process.
- ``TeamJoiner`` (joiner): joins a team from the joinable list or a shared link, or
  quick-joins, then pays (``--pay-rate``) or walks away.
- ``Browser`` (browser): reads the campaign page, the joinable teams and a team's share view.

Each task run is a new shopper (a fresh user id), so a few hundred Locust users stand for an
unbounded crowd. Business answers of the engine (``sold_out``, ``team_full``, ``not_started``,
``rate_limited``, ...) are expected outcomes, not failures; Locust counts as a failure only
what a correct engine never answers (a 5xx, a 4xx to a well-formed request, a malformed body)
and transport errors. Every answer is also tallied by request and outcome, with the id of
every order whose payment was acknowledged; workers hand their tally to the master with their
stats reports, and the master writes it to ``--tally-file`` at the end, for the verdict of
``python -m loadtests.run`` (every acknowledged payment must be a paid order in SQL).

The load shape is chosen with FLASHTEAM_LOAD_SHAPE (spike, step or soak; default spike) and
reads the common options ``--users``, ``--spawn-rate`` and ``--run-time``. Run it through
``make loadtest`` (README, "Load testing"), or by hand:

    FLASHTEAM_LOAD_SHAPE=step locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --flash-campaign lt-flash --team-campaign lt-team --gateway-token "$TOKEN" \
        --headless -u 500 -r 100 -t 60s
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.plan import DEFAULT_MIX, SHAPES, Knobs, classify, outcome_key, parse_mix


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--flash-campaign",
        env_var="FLASHTEAM_LOAD_FLASH_CAMPAIGN",
        default="",
        help="id of the flash campaign the shoppers buy from",
    )
    parser.add_argument(
        "--team-campaign",
        env_var="FLASHTEAM_LOAD_TEAM_CAMPAIGN",
        default="",
        help="id of the team campaign leaders, joiners and browsers use",
    )
    parser.add_argument(
        "--gateway-token",
        env_var="FLASHTEAM_GATEWAY_TOKEN",
        default="",
        is_secret=True,
        help="the engine's gateway token (FLASHTEAM_GATEWAY_TOKEN)",
    )
    parser.add_argument(
        "--mix",
        env_var="FLASHTEAM_LOAD_MIX",
        default=DEFAULT_MIX,
        help="scenario weights, NAME=WEIGHT,... over flash, leader, joiner, browser",
    )
    parser.add_argument(
        "--pay-rate",
        env_var="FLASHTEAM_LOAD_PAY_RATE",
        type=float,
        default=0.6,
        help="share of holds paid (flash shoppers and joiners); leaders pay at 0.9",
    )
    parser.add_argument(
        "--cancel-rate",
        env_var="FLASHTEAM_LOAD_CANCEL_RATE",
        type=float,
        default=0.2,
        help="share of flash holds cancelled; the rest are abandoned and expire",
    )
    parser.add_argument(
        "--tally-file",
        env_var="FLASHTEAM_LOAD_TALLY_FILE",
        default="",
        help="where the master writes every outcome and acknowledged payment (JSON)",
    )


@events.init.add_listener
def _weights(environment: Environment, **_: Any) -> None:
    """Apply ``--mix`` to the user classes' weights (read by the master when spawning)."""
    options = environment.parsed_options
    if options is None:
        return
    weights = parse_mix(options.mix)
    for cls in (FlashShopper, TeamLeader, TeamJoiner, Browser):
        cls.weight = weights[cls.scenario]


class Tally:
    """Outcomes by request (``name|category|detail``) and the orders whose payment was
    acknowledged, since the last hand-over."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.acknowledged: list[str] = []

    def take(self) -> dict[str, Any]:
        data = {"outcomes": dict(self.outcomes), "acknowledged": self.acknowledged}
        self.outcomes, self.acknowledged = Counter(), []
        return data

    def merge(self, data: dict[str, Any]) -> None:
        self.outcomes.update(data.get("outcomes", {}))
        self.acknowledged += data.get("acknowledged", [])


TALLY = Tally()


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["flashteam"] = TALLY.take()  # a worker: what it saw since its last report


@events.worker_report.add_listener
def _collect(client_id: str, data: dict[str, Any], **_: Any) -> None:
    TALLY.merge(data.get("flashteam", {}))  # the master: add a worker's report


@events.user_error.add_listener
def _task_error(user_instance: Any, exception: Exception, tb: Any, **_: Any) -> None:
    TALLY.outcomes[outcome_key("task", "unexpected", f"exception {exception!r}"[:120])] += 1


@events.quitting.add_listener
def _save(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.tally_file or isinstance(environment.runner, WorkerRunner):
        return
    Path(options.tally_file).write_text(json.dumps(TALLY.take()))


#: Teams opened and paid by this process's leaders: the "share links" joiners follow.
SHARED: deque[str] = deque(maxlen=1000)
#: Each campaign's item skus, fetched once per process.
SKUS: dict[str, list[str]] = {}
#: A cancel can meet a hold the reaper has just ended: 409 invalid_state, by design.
EXPIRED = frozenset({"invalid_state"})


class Visitor(FastHttpUser):
    """What every scenario shares: the gateway token, the campaigns and the outcome rules."""

    abstract = True
    scenario = ""
    wait_time = between(0.05, 0.5)
    network_timeout = 30.0
    connection_timeout = 30.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        assert options is not None
        self.headers = {"Authorization": f"Bearer {options.gateway_token}"}
        self.flash_campaign: str = options.flash_campaign
        self.team_campaign: str = options.team_campaign
        self.pay_rate: float = options.pay_rate
        self.cancel_rate: float = options.cancel_rate
        self.shopper = ""

    def new_shopper(self) -> str:
        self.shopper = f"lt-{uuid.uuid4().hex[:16]}"
        return self.shopper

    def skus(self, campaign_id: str) -> list[str]:
        if not SKUS.get(campaign_id):  # an empty answer is asked again next time
            body = self.call("GET", f"/v1/campaigns/{campaign_id}", "campaign")
            SKUS[campaign_id] = [item["sku"] for item in (body or {}).get("items", [])]
        return SKUS[campaign_id]

    def call(
        self,
        method: str,
        path: str,
        name: str,
        body: dict[str, Any] | None = None,
        also: frozenset[str] = frozenset(),
    ) -> dict[str, Any] | None:
        """One request; returns the JSON body of a 2xx, None for anything else.

        A 409 or 429 with a business code (or one of ``also``), and a 503 ``overloaded`` (shed
        at once by admission control), are expected outcomes, counted as successes, so Locust's
        failure table lists only what must not happen.
        Every answer is tallied by ``loadtests.plan.classify``.
        """
        with self.client.request(
            method, path, json=body, headers=self.headers, name=name, catch_response=True
        ) as reply:
            category, detail, result = _judge(reply, also)
            TALLY.outcomes[outcome_key(name, category, detail)] += 1
            if category in ("ok", "business", "shed"):
                reply.success()
            else:
                reply.failure(f"{category}: {detail}")
            return result

    def take(self, campaign_id: str, path: str, name: str, **extra: Any) -> dict[str, Any] | None:
        """A new shopper's first step on one unit of a random item of the campaign: reserve
        (``/orders``), open a team (``/teams``) or quick-join (``/teams/quick-join``)."""
        skus = self.skus(campaign_id)
        if not skus:
            return None
        body = {"user_id": self.new_shopper(), "sku": random.choice(skus), **extra}
        body["idempotency_key"] = self.key()
        return self.call("POST", f"/v1/campaigns/{campaign_id}{path}", name, body)

    def pay(self, order_id: str) -> bool:
        paid = self.call(
            "POST",
            f"/v1/orders/{order_id}/pay",
            "pay",
            {"user_id": self.shopper, "payment_ref": f"pay-{order_id}"},
        )
        if paid is not None:
            TALLY.acknowledged.append(order_id)
        return paid is not None

    def key(self) -> str:
        return uuid.uuid4().hex


def _judge(reply: Any, also: frozenset[str]) -> tuple[str, str, dict[str, Any] | None]:
    """(category, detail, the body of a 2xx) of one answer; a body that is not the JSON the
    contract promises (an object, with ``error.code`` on errors) is ``unexpected``."""
    status = reply.status_code
    if status == 0:  # no answer: refused, reset, timed out
        return (*classify(0, str(getattr(reply, "error", "") or "")[:120]), None)
    try:
        parsed = reply.json()
        if 200 <= status < 300:
            return "ok", str(status), dict(parsed)
        code = str(parsed["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "unexpected", f"{status} malformed body", None
    return (*classify(status, code, also), None)


class FlashShopper(Visitor):
    scenario = "flash"

    @task
    def buy(self) -> None:
        order = self.take(self.flash_campaign, "/orders", "reserve", qty=1)
        if order is None:
            return
        time.sleep(random.uniform(0.1, 1.0))  # the shopper reads the checkout page
        roll = random.random()
        if roll < self.pay_rate:
            self.pay(order["order_id"])
        elif roll < self.pay_rate + self.cancel_rate:
            cancel = f"/v1/orders/{order['order_id']}/cancel"
            self.call("POST", cancel, "cancel", {"user_id": self.shopper}, EXPIRED)
        # else: walked away; the hold expires and the unit goes back on sale


class TeamLeader(Visitor):
    scenario = "leader"

    @task
    def lead(self) -> None:
        seat = self.take(self.team_campaign, "/teams", "open team", qty=1)
        if seat is None or random.random() >= 0.9 or not self.pay(seat["order_id"]):
            return
        team_id = seat["team_id"]
        self.call("GET", f"/v1/teams/{team_id}?viewer={self.shopper}", "share view")
        SHARED.append(team_id)


class TeamJoiner(Visitor):
    scenario = "joiner"

    @task(3)
    def join_from_list(self) -> None:
        skus = self.skus(self.team_campaign)
        if not skus:
            return
        user = self.new_shopper()
        listed = self.call(
            "GET",
            f"/v1/campaigns/{self.team_campaign}/teams?sku={random.choice(skus)}"
            f"&viewer={user}&limit=10",
            "list teams",
        )
        teams = (listed or {}).get("teams", [])
        if teams:
            self.join(random.choice(teams)["team_id"])

    @task(2)
    def join_shared(self) -> None:
        if not SHARED:
            return
        user = self.new_shopper()
        team_id = random.choice(SHARED)
        view = self.call("GET", f"/v1/teams/{team_id}?viewer={user}", "share view")
        if view is not None and view["viewer_can_join"]:
            self.join(team_id)

    @task(2)
    def quick_join(self) -> None:
        self.settle(self.take(self.team_campaign, "/teams/quick-join", "quick-join"))

    def join(self, team_id: str) -> None:
        seat = self.call(
            "POST",
            f"/v1/teams/{team_id}/join",
            "join",
            {"user_id": self.shopper, "idempotency_key": self.key()},
        )
        self.settle(seat)

    def settle(self, seat: dict[str, Any] | None) -> None:
        if seat is not None and random.random() < self.pay_rate:
            time.sleep(random.uniform(0.1, 0.5))
            self.pay(seat["order_id"])


class Browser(Visitor):
    scenario = "browser"

    @task(2)
    def campaign_page(self) -> None:
        campaign = random.choice([self.flash_campaign, self.team_campaign])
        self.call("GET", f"/v1/campaigns/{campaign}", "campaign")

    @task(2)
    def team_list(self) -> None:
        skus = self.skus(self.team_campaign)
        if skus:
            self.call(
                "GET",
                f"/v1/campaigns/{self.team_campaign}/teams?sku={random.choice(skus)}&limit=20",
                "list teams",
            )

    @task(1)
    def team_page(self) -> None:
        if SHARED:
            self.call("GET", f"/v1/teams/{random.choice(SHARED)}", "share view")


_CHOSEN = os.environ.get("FLASHTEAM_LOAD_SHAPE", "spike")
if _CHOSEN not in SHAPES:
    raise SystemExit(f"FLASHTEAM_LOAD_SHAPE={_CHOSEN!r}: use one of {', '.join(SHAPES)}")


class _Shape(LoadTestShape):
    """Runs one of loadtests.plan.SHAPES over the common options -u, -r and -t.

    Locust runs the first non-abstract shape class it finds, so every shape but the one
    FLASHTEAM_LOAD_SHAPE names is abstract."""

    abstract = True
    use_common_options = True
    curve = "spike"

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        options = self.runner.environment.parsed_options
        assert options is not None
        knobs = Knobs(options.num_users or 1, options.spawn_rate or 1.0, options.run_time or 60)
        return SHAPES[self.curve](knobs, self.get_run_time())


class SpikeShape(_Shape):
    abstract = _CHOSEN != "spike"
    curve = "spike"


class StepShape(_Shape):
    abstract = _CHOSEN != "step"
    curve = "step"


class SoakShape(_Shape):
    abstract = _CHOSEN != "soak"
    curve = "soak"
