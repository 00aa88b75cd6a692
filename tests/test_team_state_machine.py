"""A stateful (hypothesis) test of team-join (group buy) against an in-memory model.

One team campaign with one sku (stock 6), five users, a per-user limit of 2 units and teams of
3 (or 2) seats, each example with or without each team deal option (docs/lifecycle.md): the
automatic success of an expiring team with 2 paid seats (teams of 3), a leader price, a cap of
1 unit per order. The machine drives open_team / leader pays / join (a given team) / quick_join /
member pays / cancel (a held seat; a paid seat of an open team is ``team_in_progress``) /
leader-hold expiry / member-hold expiry / team expiry (``age_order`` / ``age_team`` + the
reaper, sometimes several reapers at once) / after-sale refund of a succeeded team's order /
idempotent retries / rarely invalidation, in a random order. The model predicts every outcome,
rejections included (the engine must raise exactly the predicted class), and after every step:

- Invariant I3 (docs/invariants.md) on the engine's own records: per team held + paid seats <=
  team_size, one seat per user, a succeeded team has exactly team_size paid seats (one that
  succeeded automatically: its paid seats only, at least the minimum, fewer than team_size;
  never on invalidation), every order's amount is its qty at the price (the leader's at the
  leader price), and team states
  only move along pending -> open -> succeeded | failed and pending -> dissolved (both between steps
  and along every team record in the outbox stream);
- Invariants I1 / I2: per item available + held + paid + gone == initial, available >= 0; per user
  held + paid units <= the limit (and the engine's per-user counters);
- Invariant I5: each order is refunded / expired at most once in the stream, and each order's and
  each team's events are exactly the model's state changes, in order, once each;
- the engine's audit (``testkit.helpers.assert_invariants``);
- every team and order equals the model (``engine.teams.get``, ``engine.orders.get``);
- the joinable list (anonymous and per user) and every team's share view equal the model's.

The engine is async and the machine is sync: each example runs its own event loop and its own
Engine on the session's redis-server (flushed first), and every engine call goes through
``loop.run_until_complete``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine import (
    AlreadyInTeam,
    Campaign,
    CampaignKind,
    CampaignStatus,
    Engine,
    Forbidden,
    HoldExpired,
    IdempotencyMismatch,
    Invalidated,
    InvalidState,
    Item,
    LimitExceeded,
    NotFound,
    Order,
    OrderKind,
    OrderLimitExceeded,
    OrderState,
    Rejected,
    SoldOut,
    TeamClosed,
    TeamFull,
    TeamInProgress,
)
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import Team, TeamSeatResult, TeamState, to_ms
from engine.scripts import guarded
from engine.teams import ShareState, mask_user
from testkit.helpers import EVENT_OF, age_order, age_team, assert_invariants
from tests.machine import SETTINGS, EngineMachine

T = TypeVar("T")

SKU = "sku-1"
PRICE = 990
LEADER_PRICE = 490
AUTO_MIN = 2  # paid seats an expiring team of 3 succeeds with, when the option is on
STOCK = 6
USERS = ("u1", "u2", "u3", "u4", "u5")
LIMIT = 2
HOLD_SECONDS = 60
TEAM_TTL_SECONDS = 600
HOLD_MS = HOLD_SECONDS * 1000
TTL_MS = TEAM_TTL_SECONDS * 1000
AGE_ORDER_MS = HOLD_MS + 1000  # a fresh hold's deadline ends up 1 s in the past
AGE_TEAM_MS = TTL_MS + 1000  # a fresh team's expiry ends up 1 s in the past

USER = st.sampled_from(USERS)
KEY = st.sampled_from((None, None, None, "k1", "k2"))  # None: a fresh key; else maybe reused

# docs/lifecycle.md#team: the only moves a team's state may make (staying put included).
NEXT_STATES = {
    TeamState.PENDING: {TeamState.PENDING, TeamState.OPEN, TeamState.DISSOLVED},
    TeamState.OPEN: {TeamState.OPEN, TeamState.SUCCEEDED, TeamState.FAILED},
    TeamState.SUCCEEDED: {TeamState.SUCCEEDED},
    TeamState.FAILED: {TeamState.FAILED},
    TeamState.DISSOLVED: {TeamState.DISSOLVED},
}
# Where a team may be a step later (one step may pay a whole team: pending -> succeeded).
REACHABLE = {
    state: {state, *{after for step in nexts for after in NEXT_STATES[step]}}
    for state, nexts in NEXT_STATES.items()
}
DISSOLVED_WHY = {"user": "leader_cancelled", "deadline": "leader_unpaid"}
LIVE = (OrderState.HELD, OrderState.PAID)

Expected = type[Rejected] | None


@dataclass
class ModelOrder:
    """What the model knows of one team order (a seat, the leader's included)."""

    order_id: str
    user: str
    team_id: str
    qty: int
    deadline_ms: int
    state: OrderState = OrderState.HELD
    payment_ref: str | None = None
    aged: bool = False  # its deadline was moved into the past (not reaped yet)
    restocked: bool = True  # for a refunded order: its units went back on sale
    leader: bool = False  # the order that opened its team (charged the leader price)
    events: list[tuple[str, str]] = field(default_factory=lambda: [("order.reserved", "user")])


@dataclass
class ModelTeam:
    """What the model knows of one team."""

    team_id: str
    leader: str
    qty: int
    seats: list[str]  # order ids of the taken seats, leader first
    state: TeamState = TeamState.PENDING
    expires_ms: int | None = None
    aged: bool = False  # its expiry was moved into the past (not reaped yet)
    why: str | None = None
    paid_at_end: int = 0  # paid seats when it failed, dissolved or succeeded automatically
    events: list[tuple[str, str]] = field(default_factory=lambda: [("team.created", "user")])


@dataclass(frozen=True)
class Plan:
    """The model's prediction for a seat-taking call without an idempotent replay."""

    error: Expected
    team_id: str | None  # the team joined; None: a new team is opened
    qty: int


@dataclass
class Snapshot:
    """The engine's state as read from Redis between two steps."""

    status: CampaignStatus
    stock: dict[str, int]
    initial: int
    teams: dict[str, Team]
    orders: dict[str, Order]
    team_count: int
    order_count: int
    users: dict[str, int]
    order_events: dict[str, list[tuple[str, str]]]
    team_events: dict[str, list[tuple[str, str]]]
    team_paths: dict[str, list[TeamState]]
    invalidations: int


class TeamMachine(EngineMachine):
    """Random team-join traffic on one campaign, checked step by step against a model."""

    prefix = "tsm"

    def __init__(self) -> None:
        super().__init__()
        self.size = 3
        self.auto: int | None = None  # the campaign's auto_success_min_paid
        self.leader_price: int | None = None
        self.cap: int | None = None  # the campaign's per_order_limit
        self.orders: dict[str, ModelOrder] = {}
        self.teams: dict[str, ModelTeam] = {}
        self.idem: dict[tuple[str, str], tuple[str, str]] = {}  # -> (fingerprint, order id)
        self.invalidated = False
        self.fresh = 0
        self.last_states: dict[str, TeamState] = {}  # the engine's team states, last step
        self.checks = 0

    # -- plumbing ------------------------------------------------------------------------------

    async def prepare(self, engine: Engine) -> None:
        self.script_calls: Counter[str] = Counter()
        engine.runtime.scripts.observe = lambda name, _: self.script_calls.update((name,))

    def teardown(self) -> None:
        for team in getattr(self, "teams", {}).values():
            event(f"team ended {team.state}")
        super().teardown()

    def call(self, coro: Coroutine[Any, Any, T] | Settled, expected: Expected) -> T | None:
        """Run one engine call (or take the outcome it already had in a burst); it must raise
        exactly ``expected`` (None: must succeed)."""
        name = str(getattr(coro, "__qualname__", "burst"))
        try:
            result = coro.result() if isinstance(coro, Settled) else self.run(coro)
        except Rejected as exc:
            got = type(exc).__name__
            event(f"{name}: {got}")
            assert expected is not None, f"the model expected success, the engine said {got}: {exc}"
            assert type(exc) is expected, f"expected {expected.__name__}, got {got}: {exc}"
            return None
        event(f"{name}: ok")
        assert expected is None, f"expected {expected.__name__}, the engine succeeded: {result!r}"
        return result

    def key(self, key: str | None) -> str:
        if key is None:
            self.fresh += 1
            return f"fresh-{self.fresh}"
        return key

    @initialize(
        size=st.sampled_from((3, 3, 2)),
        auto=st.booleans(),
        leader=st.booleans(),
        cap=st.booleans(),
    )
    def create_campaign(self, size: int, auto: bool, leader: bool, cap: bool) -> None:
        """The campaign: active for an hour, teams of ``size``; automatic success from 2 paid
        seats (teams of 3 only), a leader price, 1 unit per order, each or not."""
        self.size = size
        self.auto = AUTO_MIN if auto and size > AUTO_MIN else None
        self.leader_price = LEADER_PRICE if leader else None
        self.cap = 1 if cap else None
        event(f"team_size {size}")
        event(f"options: auto {self.auto}, leader price {self.leader_price}, cap {self.cap}")

        async def create() -> None:
            now = await self.eng.runtime.now()
            await self.eng.campaigns.create(
                Campaign(
                    id=self.campaign_id,
                    kind=CampaignKind.TEAM,
                    title="team state machine",
                    starts_at=now - timedelta(seconds=1),
                    ends_at=now + timedelta(hours=1),
                    items=(Item(SKU, PRICE, STOCK, self.leader_price),),
                    per_user_limit=LIMIT,
                    hold_seconds=HOLD_SECONDS,
                    team_size=size,
                    team_ttl_seconds=TEAM_TTL_SECONDS,
                    per_order_limit=self.cap,
                    auto_success_min_paid=self.auto,
                )
            )

        self.run(create())

    # -- the model: queries --------------------------------------------------------------------

    def units(self, user: str) -> int:
        return sum(o.qty for o in self.orders.values() if o.user == user and o.state in LIVE)

    def stock(self) -> dict[str, int]:
        held = sum(o.qty for o in self.orders.values() if o.state is OrderState.HELD)
        paid = sum(o.qty for o in self.orders.values() if o.state is OrderState.PAID)
        gone = sum(
            o.qty
            for o in self.orders.values()
            if o.state is OrderState.REFUNDED and not o.restocked
        )
        return {"available": STOCK - held - paid - gone, "held": held, "paid": paid, "gone": gone}

    def seat_users(self, team: ModelTeam) -> list[str]:
        return [self.orders[oid].user for oid in team.seats]

    def counts(self, team: ModelTeam) -> tuple[int, int]:
        """(held, paid) seats as the team record should say."""
        if team.state in (TeamState.PENDING, TeamState.OPEN):
            states = Counter(self.orders[oid].state for oid in team.seats)
            return states[OrderState.HELD], states[OrderState.PAID]
        if team.state is TeamState.SUCCEEDED and team.why is None:
            return 0, self.size
        return 0, team.paid_at_end

    def remaining(self, team: ModelTeam) -> int:
        held, paid = self.counts(team)
        return self.size - held - paid

    def joinable(self, team: ModelTeam) -> bool:
        return team.state is TeamState.OPEN and not team.aged and self.remaining(team) > 0

    def joinable_ids(self, viewer: str | None = None) -> list[str]:
        """Open, not expired, not full, without the viewer: fewest remaining seats first, then
        earliest expiry (then team id, as the index orders them)."""
        teams = [
            t
            for t in self.teams.values()
            if self.joinable(t) and (viewer is None or viewer not in self.seat_users(t))
        ]
        teams.sort(key=lambda t: (self.remaining(t), t.expires_ms or 0, t.team_id))
        return [t.team_id for t in teams]

    def open_ids(self) -> list[str]:
        return sorted(t.team_id for t in self.teams.values() if t.state is TeamState.OPEN)

    def held_ids(self, *, leader: bool | None = None, aged: bool | None = None) -> list[str]:
        """Held orders; ``leader``: only leaders' (True) or members' (False) seats."""
        return sorted(
            o.order_id
            for o in self.orders.values()
            if o.state is OrderState.HELD
            and (leader is None or (self.teams[o.team_id].seats[0] == o.order_id) is leader)
            and (aged is None or o.aged is aged)
        )

    def due(self) -> bool:
        if self.invalidated:
            return bool(self.held_ids() or self.open_ids())
        return bool(self.held_ids(aged=True) or [t for t in self.teams.values() if self.expired(t)])

    def expired(self, team: ModelTeam) -> bool:
        return team.state is TeamState.OPEN and (team.aged or self.invalidated)

    def auto_succeeds(self, team: ModelTeam) -> bool:
        """Whether the open team, its time run out, succeeds automatically (never on
        invalidation)."""
        return self.auto is not None and not self.invalidated and self.counts(team)[1] >= self.auto

    def unit_price(self, order: ModelOrder) -> int:
        return LEADER_PRICE if order.leader and self.leader_price is not None else PRICE

    # -- the model: predictions ----------------------------------------------------------------

    def seat_blocked(self, user: str, qty: int) -> Expected:
        if self.cap is not None and qty > self.cap:
            return OrderLimitExceeded
        if self.units(user) + qty > LIMIT:
            return LimitExceeded
        if self.stock()["available"] < qty:
            return SoldOut
        return None

    def plan_open(self, user: str, qty: int) -> Plan:
        if self.invalidated:
            return Plan(Invalidated, None, qty)
        return Plan(self.seat_blocked(user, qty), None, qty)

    def plan_join(self, team_id: str, user: str) -> Plan:
        team = self.teams.get(team_id)
        if self.invalidated:
            return Plan(Invalidated, team_id, 0)
        if team is None:
            return Plan(NotFound, team_id, 0)
        if team.state is not TeamState.OPEN or team.aged:
            return Plan(TeamClosed, team_id, team.qty)
        if user in self.seat_users(team):
            return Plan(AlreadyInTeam, team_id, team.qty)
        if self.remaining(team) <= 0:
            return Plan(TeamFull, team_id, team.qty)
        return Plan(self.seat_blocked(user, team.qty), team_id, team.qty)

    def plan_quick(self, user: str) -> Plan:
        """The best open team the user is not in and can afford (limit, stock for the team's
        units per seat), else a new one-unit team."""
        if self.invalidated:
            return Plan(Invalidated, None, 1)
        for team_id in self.joinable_ids(viewer=user):
            team = self.teams[team_id]
            if self.seat_blocked(user, team.qty) is None:
                return Plan(None, team.team_id, team.qty)
        return Plan(self.seat_blocked(user, 1), None, 1)

    def predict_pay(self, order: ModelOrder, payer: str, ref: str) -> Expected:
        if payer != order.user:
            return Forbidden
        if order.state is OrderState.PAID and order.payment_ref == ref:
            return None  # a retry: no-op success
        if order.state is OrderState.EXPIRED:
            return HoldExpired
        if order.state is not OrderState.HELD:
            return InvalidState
        if order.aged:
            return HoldExpired
        if self.invalidated:
            return Invalidated
        if self.teams[order.team_id].state not in (TeamState.PENDING, TeamState.OPEN):
            return TeamClosed
        return None

    def predict_cancel(self, order: ModelOrder, user: str) -> Expected:
        team = self.teams[order.team_id]
        if user != order.user:
            return Forbidden
        if order.state in (OrderState.CANCELLED, OrderState.EXPIRED):
            return None  # the hold already ended: answered as it is
        if order.state is OrderState.PAID and team.state in (TeamState.PENDING, TeamState.OPEN):
            return TeamInProgress
        if order.state is not OrderState.HELD:
            return InvalidState
        return None

    def predict_refund(self, order: ModelOrder) -> Expected:
        if order.state is OrderState.REFUNDED:
            return None  # a retry: no-op success
        if order.state is not OrderState.PAID:
            return InvalidState
        if self.teams[order.team_id].state is not TeamState.SUCCEEDED:
            return TeamInProgress
        return None

    # -- the model: state changes --------------------------------------------------------------

    @staticmethod
    def move(order: ModelOrder, state: OrderState, reason: str, restock: bool = True) -> None:
        order.state = state
        order.events.append((EVENT_OF[state], reason))
        if state is OrderState.REFUNDED:
            order.restocked = restock

    def release_seat(self, order: ModelOrder, reason: str) -> None:
        """A held seat ended: a pending team dissolves; an open team frees the seat."""
        team = self.teams[order.team_id]
        if team.state is TeamState.PENDING:
            team.state = TeamState.DISSOLVED
            team.why = DISSOLVED_WHY.get(reason, reason)
            team.events.append(("team.dissolved", reason))
        elif team.state is TeamState.OPEN and order.order_id in team.seats:
            team.seats.remove(order.order_id)
            team.events.append(("team.seat_released", reason))

    def succeed_automatically(self, team: ModelTeam) -> None:
        """An expired open team with enough paid seats succeeds: held seats expire and leave
        it, paid seats stand."""
        team.paid_at_end = self.counts(team)[1]
        for oid in list(team.seats):
            order = self.orders[oid]
            if order.state is OrderState.HELD:
                self.move(order, OrderState.EXPIRED, "team_succeeded")
                team.seats.remove(oid)
        team.state = TeamState.SUCCEEDED
        team.why = "auto"
        team.events.append(("team.succeeded", "auto"))

    def fail(self, team: ModelTeam, why: str) -> None:
        """An open team fails: paid seats refunded (restocked), held seats end."""
        team.paid_at_end = self.counts(team)[1]
        for oid in team.seats:
            order = self.orders[oid]
            if order.state is OrderState.PAID:
                self.move(order, OrderState.REFUNDED, "team_failed")
            elif order.state is OrderState.HELD:
                end = OrderState.CANCELLED if why == "invalidated" else OrderState.EXPIRED
                self.move(order, end, "team_failed")
        team.state = TeamState.FAILED
        team.why = why
        team.events.append(("team.failed", why))

    def reap_model(self) -> int:
        """What a reaper pass does now: fail due teams, then end due holds; returns the count
        the reaper reports (teams failed + holds ended on their own)."""
        why = "invalidated" if self.invalidated else "expired"
        teams = [t for t in self.teams.values() if self.expired(t)]
        for team in teams:
            if self.auto_succeeds(team):
                self.succeed_automatically(team)
            else:
                self.fail(team, why)
        holds = self.held_ids() if self.invalidated else self.held_ids(aged=True)
        for oid in holds:
            order = self.orders[oid]
            if self.invalidated:
                self.move(order, OrderState.CANCELLED, "invalidated")
                self.release_seat(order, "invalidated")
            else:
                self.move(order, OrderState.EXPIRED, "deadline")
                self.release_seat(order, "deadline")
        return len(teams) + len(holds)

    # -- seat-taking calls: open, join, quick-join ---------------------------------------------

    def attempt(
        self,
        user: str,
        key: str,
        fingerprint: str,
        plan: Plan,
        coro: Coroutine[Any, Any, TeamSeatResult] | Settled,
    ) -> str | None:
        """One seat-taking call: a replay of the key's first call, a mismatch, or the plan.
        Returns the new order's id."""
        prior = self.idem.get((user, key))
        if prior is None:
            expected = plan.error
        else:
            expected = None if prior[0] == fingerprint else IdempotencyMismatch
        got = self.call(coro, expected)
        if got is None:
            return None
        if prior is not None:
            self.check_replay(got, prior[1])
            return None
        assert not got.replayed
        order_id = self.record_seat(got, user, plan)
        self.idem[(user, key)] = (fingerprint, order_id)
        return order_id

    def check_replay(self, got: TeamSeatResult, order_id: str) -> None:
        """An idempotent retry returns the original order and its team, as they are now."""
        model = self.orders[order_id]
        team = self.teams[model.team_id]
        assert got.replayed
        assert got.order.order_id == order_id
        assert got.order.state is model.state
        assert got.team.team_id == team.team_id
        assert got.team.state is team.state
        assert got.opened is (team.seats[0] == order_id)

    def record_seat(self, got: TeamSeatResult, user: str, plan: Plan) -> str:
        order, team = got.order, got.team
        oid = order.order_id
        assert oid not in self.orders
        assert (order.user_id, order.sku, order.qty) == (user, SKU, plan.qty)
        assert (order.state, order.kind, order.team_id) == (
            OrderState.HELD,
            OrderKind.TEAM,
            team.team_id,
        )
        leads = plan.team_id is None
        unit = LEADER_PRICE if leads and self.leader_price is not None else PRICE
        assert order.amount == plan.qty * unit, (order, plan)
        created, deadline = to_ms(order.created_at), to_ms(order.expires_at)
        if plan.team_id is None:  # a new pending team led by the user
            assert got.opened
            assert team.team_id not in self.teams
            assert team.state is TeamState.PENDING
            assert deadline == created + HOLD_MS
            self.teams[team.team_id] = ModelTeam(team.team_id, user, plan.qty, [oid])
        else:  # a seat in an open team, held at most until the team's expiry
            assert not got.opened
            assert team.team_id == plan.team_id
            model = self.teams[plan.team_id]
            assert model.expires_ms is not None
            assert deadline == min(created + HOLD_MS, model.expires_ms)
            model.seats.append(oid)
            model.events.append(("team.joined", "user"))
        self.orders[oid] = ModelOrder(oid, user, team.team_id, plan.qty, deadline, leader=leads)
        return oid

    def open_and_check(self, user: str, qty: int, key: str) -> str | None:
        coro = self.eng.teams.open(self.campaign_id, user, SKU, qty, key)
        return self.attempt(user, key, f"open:{SKU}:{qty}", self.plan_open(user, qty), coro)

    def join_and_check(
        self, team_id: str, user: str, key: str, settled: Settled | None = None
    ) -> str | None:
        plan = self.plan_join(team_id, user)
        coro = settled or self.eng.teams.join(team_id, user, key)
        return self.attempt(user, key, f"join:{team_id}", plan, coro)

    def quick_and_check(self, user: str, key: str, settled: Settled | None = None) -> str | None:
        plan = self.plan_quick(user)
        coro = settled or self.eng.teams.quick_join(self.campaign_id, user, SKU, key)
        return self.attempt(user, key, f"quick:{SKU}", plan, coro)

    @rule(user=USER, qty=st.integers(1, 2), key=KEY)
    def open_team(self, user: str, qty: int, key: str | None) -> None:
        """A leader opens a team (pending until they pay)."""
        self.open_and_check(user, qty, self.key(key))

    @precondition(lambda self: bool(self.open_ids()))
    @rule(data=st.data(), user=USER, key=KEY)
    def join_open_team(self, data: st.DataObject, user: str, key: str | None) -> None:
        """A user joins an open team (full, already in it, over the limit: rejected)."""
        team_id = data.draw(st.sampled_from(self.open_ids()), label="team")
        self.join_and_check(team_id, user, self.key(key))

    @precondition(lambda self: bool(self.teams))
    @rule(data=st.data(), user=USER, key=KEY, bogus=st.integers(0, 9))
    def join_any_team(self, data: st.DataObject, user: str, key: str | None, bogus: int) -> None:
        """A join of any team (or, one time in ten, of one that does not exist)."""
        team_id = data.draw(st.sampled_from(sorted(self.teams)), label="team")
        if bogus == 0:
            team_id = f"{self.campaign_id}.t999"
        self.join_and_check(team_id, user, self.key(key))

    @rule(
        data=st.data(),
        burst=st.lists(st.tuples(st.booleans(), USER, KEY), min_size=2, max_size=6),
    )
    def seat_burst(self, data: st.DataObject, burst: list[tuple[bool, str, str | None]]) -> None:
        """Concurrent joins and quick-joins: coalesced into one batch.lua call, they run in
        arrival order, and the model checks each one's own outcome in that order."""
        teams = sorted(self.teams) or [f"{self.campaign_id}.t999"]
        calls = [
            (data.draw(st.sampled_from(teams), label="team") if join else None, user, self.key(key))
            for join, user, key in burst
        ]
        engine, cid = self.eng, self.campaign_id

        async def together() -> list[Settled]:
            return await asyncio.gather(
                *(
                    Settled.of(
                        engine.teams.join(team, user, key)
                        if team is not None
                        else engine.teams.quick_join(cid, user, SKU, key)
                    )
                    for team, user, key in calls
                )
            )

        batches = self.script_calls["batch"]
        settled = self.run(together())
        assert self.script_calls["batch"] == batches + 1, "the burst was not one coalesced call"
        for (team, user, key), outcome in zip(calls, settled, strict=True):
            if team is None:
                self.quick_and_check(user, key, outcome)
            else:
                self.join_and_check(team, user, key, outcome)

    @rule(user=USER, key=KEY)
    def quick_join(self, user: str, key: str | None) -> None:
        """Pinduoduo-style matching: the best open team, else a new one."""
        self.quick_and_check(user, self.key(key))

    @precondition(lambda self: bool(self.idem))
    @rule(data=st.data(), mismatch=st.sampled_from((False, False, True)))
    def retry(self, data: st.DataObject, mismatch: bool) -> None:
        """The gateway retries a seat call with its key: the same order, or a mismatch when the
        parameters differ."""
        user, key = data.draw(st.sampled_from(sorted(self.idem)), label="user, key")
        fingerprint, order_id = self.idem[(user, key)]
        model = self.orders[order_id]
        op = fingerprint.split(":", 1)[0]
        if op == "open":
            qty = model.qty % 2 + 1 if mismatch else model.qty
            self.open_and_check(user, qty, key)
        elif op == "join" and not mismatch:
            self.join_and_check(model.team_id, user, key)
        elif op == "join" or (op == "quick" and not mismatch):
            self.quick_and_check(user, key)  # for a join key: a mismatch
        else:
            self.open_and_check(user, 1, key)

    # -- payment, cancellation, refunds --------------------------------------------------------

    def pay_and_check(self, order_id: str, payer: str, ref: str) -> None:
        model = self.orders[order_id]
        expected = self.predict_pay(model, payer, ref)
        paid = self.call(self.eng.orders.pay(order_id, payer, ref), expected)
        if paid is None:
            return
        assert (paid.state, paid.payment_ref) == (OrderState.PAID, ref)
        if model.state is not OrderState.HELD:
            return  # a retry with the same reference: a no-op
        self.move(model, OrderState.PAID, "user")
        model.payment_ref = ref
        team = self.teams[model.team_id]
        if team.state is TeamState.PENDING:  # the leader paid: the team opens, its clock starts
            record = self.run(self.eng.teams.get(team.team_id))
            assert record.opened_at is not None and record.expires_at is not None
            assert to_ms(record.expires_at) - to_ms(record.opened_at) == TTL_MS
            team.state = TeamState.OPEN
            team.expires_ms = to_ms(record.expires_at)
            team.events.append(("team.opened", "user"))
        elif self.counts(team)[1] == self.size:
            team.state = TeamState.SUCCEEDED
            team.events.append(("team.succeeded", "user"))
        else:
            team.events.append(("team.seat_paid", "user"))

    @precondition(lambda self: bool(self.held_ids(leader=True)))
    @rule(data=st.data())
    def leader_pays(self, data: st.DataObject) -> None:
        """The leader pays: the team opens (HoldExpired if the hold ran out)."""
        order_id = data.draw(st.sampled_from(self.held_ids(leader=True)), label="order")
        self.pay_and_check(order_id, self.orders[order_id].user, f"pay-{order_id}")

    @precondition(lambda self: bool(self.held_ids(leader=False)))
    @rule(data=st.data())
    def member_pays(self, data: st.DataObject) -> None:
        """A member pays a held seat: the last paid seat makes the team succeed."""
        order_id = data.draw(st.sampled_from(self.held_ids(leader=False)), label="order")
        self.pay_and_check(order_id, self.orders[order_id].user, f"pay-{order_id}")

    @precondition(lambda self: bool(self.orders))
    @rule(data=st.data(), payer=st.none() | USER, other_ref=st.booleans())
    def pay_any(self, data: st.DataObject, payer: str | None, other_ref: bool) -> None:
        """Any order, any payer, either of two references: retries and rejections."""
        order_id = data.draw(st.sampled_from(sorted(self.orders)), label="order")
        ref = f"pay2-{order_id}" if other_ref else f"pay-{order_id}"
        self.pay_and_check(order_id, payer or self.orders[order_id].user, ref)

    def fillable(self) -> list[str]:
        """Pending teams and open teams with a free seat."""
        pending = [t.team_id for t in self.teams.values() if t.state is TeamState.PENDING]
        return sorted({*pending, *self.joinable_ids()})

    @precondition(lambda self: bool(self.fillable()))
    @rule(data=st.data())
    def fill_team(self, data: st.DataObject) -> None:
        """Friends answer a shared link: the leader and the held seats pay, then new members
        join and pay until the team is full (or a hold, the limit or the stock says no)."""
        team = self.teams[data.draw(st.sampled_from(self.fillable()), label="team")]
        for order_id in list(team.seats):
            if self.orders[order_id].state is OrderState.HELD:
                self.pay_and_check(order_id, self.orders[order_id].user, f"pay-{order_id}")
        for user in USERS:
            if not self.joinable(team) or user in self.seat_users(team):
                continue
            seat = self.join_and_check(team.team_id, user, self.key(None))
            if seat is not None:
                self.pay_and_check(seat, user, f"pay-{seat}")

    @rule(
        leader=USER,
        member=USER,
        then=st.sampled_from(("wait", "expire", "expire and reap", "expire and reap")),
        reapers=st.integers(1, 3),
    )
    def two_paid_seats(self, leader: str, member: str, then: str, reapers: int) -> None:
        """A leader opens a team and pays, a friend joins and pays: in a team of 3, one paid
        seat short of success (or a rejection on the way, checked as ever); then maybe its
        time runs out (the automatic success's case), and maybe reapers run."""
        order_id = self.open_and_check(leader, 1, self.key(None))
        if order_id is None:
            return
        self.pay_and_check(order_id, leader, f"pay-{order_id}")
        team = self.teams[self.orders[order_id].team_id]
        if not self.joinable(team):
            return
        seat = self.join_and_check(team.team_id, member, self.key(None))
        if seat is not None:
            self.pay_and_check(seat, member, f"pay-{seat}")
        if then != "wait" and team.state is TeamState.OPEN:
            self.expire_team(team)
            if then == "expire and reap":
                self.reap(reapers)

    @precondition(lambda self: bool(self.joinable_ids()))
    @rule(data=st.data())
    def crowd_team(self, data: st.DataObject) -> None:
        """Everybody opens the shared link at once and takes a seat without paying yet: held
        seats count as taken, so the team fills and the rest get TeamFull (or AlreadyInTeam,
        LimitExceeded, SoldOut), never an over-filled team."""
        team_id = data.draw(st.sampled_from(self.joinable_ids()), label="team")
        for user in data.draw(st.permutations(USERS), label="users"):
            self.join_and_check(team_id, user, self.key(None))

    def cancel_and_check(self, order_id: str, user: str) -> None:
        model = self.orders[order_id]
        expected = self.predict_cancel(model, user)
        cancelled = self.call(self.eng.orders.cancel(order_id, user), expected)
        if cancelled is None:
            return
        if model.state is OrderState.EXPIRED:  # the hold ended first: nothing changes
            assert cancelled.state is OrderState.EXPIRED
            return
        assert cancelled.state is OrderState.CANCELLED
        if model.state is OrderState.HELD:  # else a retry: nothing changes
            self.move(model, OrderState.CANCELLED, "user")
            self.release_seat(model, "user")

    @precondition(lambda self: bool(self.held_ids()))
    @rule(data=st.data())
    def cancel_held(self, data: st.DataObject) -> None:
        """The owner cancels a held seat (a pending team's leader dissolves it)."""
        order_id = data.draw(st.sampled_from(self.held_ids()), label="order")
        self.cancel_and_check(order_id, self.orders[order_id].user)

    @precondition(lambda self: bool(self.orders))
    @rule(data=st.data(), user=st.none() | USER)
    def cancel_any(self, data: st.DataObject, user: str | None) -> None:
        """Any order, any user: a paid seat of an open team is TeamInProgress."""
        order_id = data.draw(st.sampled_from(sorted(self.orders)), label="order")
        self.cancel_and_check(order_id, user or self.orders[order_id].user)

    def refund_and_check(self, order_id: str, restock: bool) -> None:
        model = self.orders[order_id]
        refunded = self.call(self.eng.orders.refund(order_id, restock), self.predict_refund(model))
        if refunded is None:
            return
        assert refunded.state is OrderState.REFUNDED
        if model.state is OrderState.PAID:  # else a retry: nothing changes, whatever ``restock``
            self.move(model, OrderState.REFUNDED, "restock" if restock else "no_restock", restock)

    def succeeded_paid(self) -> list[str]:
        return sorted(
            o.order_id
            for o in self.orders.values()
            if o.state is OrderState.PAID and self.teams[o.team_id].state is TeamState.SUCCEEDED
        )

    @precondition(lambda self: bool(self.succeeded_paid()))
    @rule(data=st.data(), restock=st.booleans())
    def refund_succeeded(self, data: st.DataObject, restock: bool) -> None:
        """After-sale refund of an order of a succeeded team."""
        order_id = data.draw(st.sampled_from(self.succeeded_paid()), label="order")
        self.refund_and_check(order_id, restock)

    @precondition(lambda self: bool(self.orders))
    @rule(data=st.data(), restock=st.booleans())
    def refund_any(self, data: st.DataObject, restock: bool) -> None:
        """Refund of any order: paid seats of an open team are TeamInProgress."""
        order_id = data.draw(st.sampled_from(sorted(self.orders)), label="order")
        self.refund_and_check(order_id, restock)

    # -- time: hold expiry, team expiry, the reaper --------------------------------------------

    def age(self, order_id: str) -> None:
        self.run(age_order(self.eng, order_id, AGE_ORDER_MS))
        model = self.orders[order_id]
        model.aged = True
        model.deadline_ms -= AGE_ORDER_MS

    @precondition(lambda self: bool(self.held_ids(leader=True, aged=False)))
    @rule(data=st.data(), then_reap=st.booleans())
    def leader_hold_expires(self, data: st.DataObject, then_reap: bool) -> None:
        """The leader never pays: the hold runs out; the reaper dissolves the team."""
        order_id = data.draw(st.sampled_from(self.held_ids(leader=True, aged=False)))
        self.age(order_id)
        if then_reap:
            self.reap(1)

    @precondition(lambda self: bool(self.held_ids(leader=False, aged=False)))
    @rule(data=st.data(), then_reap=st.booleans())
    def member_hold_expires(self, data: st.DataObject, then_reap: bool) -> None:
        """A member never pays: the seat's hold runs out; the reaper frees the seat."""
        order_id = data.draw(st.sampled_from(self.held_ids(leader=False, aged=False)))
        self.age(order_id)
        if then_reap:
            self.reap(1)

    @precondition(lambda self: bool([t for t in self.open_ids() if not self.teams[t].aged]))
    @rule(data=st.data(), then_reap=st.booleans())
    def team_expires(self, data: st.DataObject, then_reap: bool) -> None:
        """An open team's time runs out (and with it its held seats' holds, which never outlive
        the team); the reaper fails it: paid seats refunded, held seats expired (or, with the
        automatic success on and enough seats paid, it succeeds)."""
        choices = [t for t in self.open_ids() if not self.teams[t].aged]
        self.expire_team(self.teams[data.draw(st.sampled_from(choices), label="team")])
        if then_reap:
            self.reap(1)

    def expire_team(self, team: ModelTeam) -> None:
        """Age the team past its expiry, and its held seats with it."""
        self.run(age_team(self.eng, team.team_id, AGE_TEAM_MS))
        team.aged = True
        assert team.expires_ms is not None
        team.expires_ms -= AGE_TEAM_MS
        for order_id in team.seats:
            order = self.orders[order_id]
            if order.state is OrderState.HELD and not order.aged:
                self.age(order_id)

    def almost_full(self) -> list[str]:
        """Open teams, not expired yet, with every seat but one paid (2 of 3): those the
        automatic success is for."""
        return [
            t.team_id
            for t in self.teams.values()
            if t.state is TeamState.OPEN
            and not t.aged
            and self.counts(t)[1] >= self.size - 1 >= AUTO_MIN
        ]

    @precondition(lambda self: bool(self.almost_full()))
    @rule(data=st.data(), then_reap=st.booleans(), reapers=st.integers(1, 3))
    def almost_full_team_expires(self, data: st.DataObject, then_reap: bool, reapers: int) -> None:
        """An open team one paid seat short runs out of time: with the automatic success on it
        succeeds (its held seat released), else it fails."""
        team_id = data.draw(st.sampled_from(self.almost_full()), label="team")
        self.expire_team(self.teams[team_id])
        if then_reap:
            self.reap(reapers)

    @precondition(lambda self: self.due())
    @rule(reapers=st.integers(1, 3))
    def reap(self, reapers: int) -> None:
        """One or several reapers at once: everything due ends exactly once."""
        eng, cid = self.eng, self.campaign_id

        async def one(i: int) -> int:
            if i % 2:
                return await eng.reaper.run_once()
            return (await eng.reaper.expire_campaign(cid))[0]

        async def together() -> list[int]:
            return list(await asyncio.gather(*(one(i) for i in range(reapers))))

        ended = self.run(together())
        expected = self.reap_model()
        event(f"reap: {expected} due")
        assert sum(ended) == expected, f"reapers ended {ended}, the model says {expected} were due"

    @precondition(lambda self: len(self.orders) >= 4)
    @rule(roll=st.integers(0, 15))
    def invalidate(self, roll: int) -> None:
        """Rarely: the merchant ends the campaign early (or retries that). The cascade runs at
        once (docs/lifecycle.md#campaign): open teams fail and refund, held orders are cancelled
        and their stock returned before invalidate() returns, so a reaper finds nothing left to
        do."""
        if roll != 0:
            return
        view = self.run(self.eng.campaigns.invalidate(self.campaign_id))
        assert view.status is CampaignStatus.INVALIDATED
        self.invalidated = True
        event(f"invalidate: {self.reap_model()} ended")
        assert self.run(self.eng.reaper.run_once()) == 0

    # -- read-only views, checked after every step ---------------------------------------------

    def check_joinable(self, viewer: str | None) -> None:
        """The product page's joinable teams: the model's, in the model's order."""
        teams = self.run(self.eng.teams.joinable(self.campaign_id, SKU, viewer))
        assert [t.team_id for t in teams] == self.joinable_ids(viewer), f"viewer {viewer}"

    def check_view(self, team: ModelTeam, viewer: str | None) -> None:
        """The page a shared team link opens."""
        view = self.run(self.eng.teams.view(team.team_id, viewer))
        users = self.seat_users(team)
        auto = team.why == "auto"
        if self.invalidated and team.state is not TeamState.SUCCEEDED:
            state = ShareState.CAMPAIGN_INVALIDATED
        elif team.state is TeamState.OPEN and team.aged and self.auto_succeeds(team):
            state, auto = ShareState.SUCCEEDED, True  # the reaper is about to make it so
        elif team.state is TeamState.OPEN and team.aged:
            state = ShareState.FAILED
        elif team.state is TeamState.OPEN and self.remaining(team) == 0:
            state = ShareState.FULL_AWAITING_PAYMENT
        else:
            state = ShareState(team.state.value)
        assert view.share_state is state, team.team_id
        assert view.auto_succeeded is auto, team.team_id
        assert [(m.name, m.leader, m.paid) for m in view.members] == [
            (mask_user(self.orders[oid].user), i == 0, self.orders[oid].state in paid_states())
            for i, oid in enumerate(team.seats)
        ]
        assert view.viewer_in_team is (viewer in users)
        can_join = state is ShareState.OPEN and viewer is not None and viewer not in users
        assert view.viewer_can_join is can_join

    @invariant()
    def views_match_model(self) -> None:
        self.checks += 1
        for viewer in (None, *USERS):
            self.check_joinable(viewer)
        for i, team in enumerate(self.teams.values()):
            # Every team, each step through another viewer: anonymous, or one of the users.
            viewers = (None, *USERS)
            self.check_view(team, viewers[(self.checks + i) % len(viewers)])

    # -- the invariants, after every step -------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        eng, keys = self.eng, keys_of(self.campaign_id)
        redis = eng.runtime.redis
        view = await eng.campaigns.get(self.campaign_id)
        (item,) = view.stock
        users: dict[str, str] = await guarded(redis.hgetall(keys.users))
        entries: list[tuple[str, dict[str, str]]] = await guarded(redis.xrange(keys.events))
        snap = Snapshot(
            status=view.status,
            stock={
                "available": item.available,
                "held": item.held,
                "paid": item.paid,
                "gone": item.gone,
            },
            initial=item.initial,
            teams={tid: await eng.teams.get(tid) for tid in self.teams},
            orders={oid: await eng.orders.get(oid) for oid in self.orders},
            team_count=await guarded(redis.hlen(keys.teams)),
            order_count=await guarded(redis.hlen(keys.orders)),
            users={user: int(units) for user, units in users.items()},
            order_events={},
            team_events={},
            team_paths={},
            invalidations=0,
        )
        for _, entry in entries:
            read_event(snap, entry)
        await assert_invariants(eng, self.campaign_id)
        return snap

    @invariant()
    def engine_keeps_the_invariants(self) -> None:
        snap = self.run(self.snapshot())
        check_team_rules(snap, self.size, self.auto, self.last_states)
        self.last_states = {tid: team.state for tid, team in snap.teams.items()}
        check_stock_and_limits(snap)
        check_exactly_once(snap)
        self.check_model(snap)

    def check_model(self, snap: Snapshot) -> None:
        """The engine's teams, orders, stock and events equal the model's."""
        assert snap.stock == self.stock()
        assert self.stock()["available"] >= 0
        assert (snap.team_count, snap.order_count) == (len(self.teams), len(self.orders))
        for user in USERS:
            assert snap.users.get(user, 0) == self.units(user), user
        for oid, model in self.orders.items():
            got = snap.orders[oid]
            assert (got.user_id, got.qty, got.team_id, got.state, got.payment_ref) == (
                model.user,
                model.qty,
                model.team_id,
                model.state,
                model.payment_ref,
            ), oid
            assert got.amount == model.qty * self.unit_price(model), oid
            assert to_ms(got.expires_at) == model.deadline_ms, oid
            assert got.version == len(model.events), oid
        for tid, model_team in self.teams.items():
            self.check_team(snap.teams[tid], model_team)
        assert snap.order_events == {oid: m.events for oid, m in self.orders.items()}
        assert snap.team_events == {tid: t.events for tid, t in self.teams.items()}
        assert snap.invalidations == int(self.invalidated)
        status = CampaignStatus.INVALIDATED if self.invalidated else CampaignStatus.ACTIVE
        assert snap.status is status

    def check_team(self, got: Team, model: ModelTeam) -> None:
        tid = model.team_id
        assert (got.leader_id, got.sku, got.qty, got.size) == (
            model.leader,
            SKU,
            model.qty,
            self.size,
        ), tid
        assert got.state is model.state, f"{tid}: engine {got.state}, model {model.state}"
        assert (got.held, got.paid) == self.counts(model), f"{tid}: {got}"
        assert [s.order_id for s in got.seats] == model.seats, tid
        assert [s.user_id for s in got.seats] == self.seat_users(model), tid
        assert got.why == model.why, tid
        assert got.version == len(model.events), tid
        if model.expires_ms is None:
            assert got.opened_at is None and got.expires_at is None, tid
        else:
            assert got.opened_at is not None and got.expires_at is not None, tid
            assert to_ms(got.expires_at) == model.expires_ms, tid


def paid_states() -> tuple[OrderState, OrderState]:
    return OrderState.PAID, OrderState.REFUNDED


def read_event(snap: Snapshot, entry: dict[str, str]) -> None:
    """File one outbox entry under its team or order; each record must match its event."""
    if entry["type"] == "campaign.invalidated":
        snap.invalidations += 1
    elif "team" in entry:
        tid = entry["team"]
        seen = snap.team_events.setdefault(tid, [])
        seen.append((entry["type"], entry["reason"]))
        team = Team.from_record(tid, entry["record"])
        assert team.version == len(seen), f"{tid}: version {team.version} at event {len(seen)}"
        snap.team_paths.setdefault(tid, []).append(team.state)
    else:
        oid = entry["order"]
        seen = snap.order_events.setdefault(oid, [])
        seen.append((entry["type"], entry["reason"]))
        order = Order.from_record(oid, entry["record"])
        assert EVENT_OF[order.state] == entry["type"], f"{oid}: {entry}"
        assert order.version == len(seen), f"{oid}: version {order.version} at event {len(seen)}"


def check_team_rules(
    snap: Snapshot, size: int, auto: int | None, last: dict[str, TeamState]
) -> None:
    """Invariant I3 on the engine's own records (``auto``: the campaign's
    auto_success_min_paid)."""
    seated: Counter[tuple[str, str]] = Counter()
    for order in snap.orders.values():
        if order.state in LIVE and order.team_id is not None:
            seated[(order.team_id, order.user_id)] += 1
    assert all(n == 1 for n in seated.values()), f"a user holds two seats: {seated}"
    for tid, team in snap.teams.items():
        assert team.held + team.paid <= size, f"{tid}: over-filled: {team}"
        users = [seat.user_id for seat in team.seats]
        assert len(users) == len(set(users)), f"{tid}: a user holds two seats: {users}"
        if team.auto_succeeded:
            assert auto is not None, f"{tid}: succeeded automatically with the option off"
            assert auto <= team.paid < size and team.held == 0, f"{tid}: {team}"
            assert team.paid == len(team.seats), f"{tid}: a seat not paid: {team}"
        elif team.state is TeamState.SUCCEEDED:
            assert team.paid == size == len(team.seats), f"{tid}: succeeded short: {team}"
        if team.state is TeamState.SUCCEEDED:
            states = {snap.orders[seat.order_id].state for seat in team.seats}
            assert states <= set(paid_states()), f"{tid}: succeeded with {states}"
        if tid in last:
            assert team.state in REACHABLE[last[tid]], f"{tid}: {last[tid]} -> {team.state}"
        path = snap.team_paths[tid]
        assert path[0] is TeamState.PENDING, f"{tid}: born {path[0]}"
        for before, after in itertools.pairwise(path):
            assert after in NEXT_STATES[before], f"{tid}: {before} -> {after} in {path}"
        assert path[-1] is team.state, f"{tid}: last event {path[-1]}, record {team.state}"


def check_stock_and_limits(snap: Snapshot) -> None:
    """Invariants I1 and I2 on the engine's own records."""
    assert snap.initial == STOCK
    assert sum(snap.stock.values()) == STOCK, f"stock leaked or oversold: {snap.stock}"
    assert snap.stock["available"] >= 0, f"oversold: {snap.stock}"
    units: Counter[str] = Counter()
    for order in snap.orders.values():
        if order.state in LIVE:
            units[order.user_id] += order.qty
    assert all(n <= LIMIT for n in units.values()), f"over the per-user limit: {units}"


def check_exactly_once(snap: Snapshot) -> None:
    """Invariant I5: no order is refunded or expired twice."""
    for oid, events in snap.order_events.items():
        types = Counter(etype for etype, _ in events)
        assert types["order.refunded"] <= 1, f"{oid} refunded twice: {events}"
        assert types["order.expired"] <= 1, f"{oid} expired twice: {events}"


@dataclass(frozen=True)
class Settled:
    """The outcome a call already had: its result, or the rejection it raised."""

    value: Any

    @classmethod
    async def of(cls, coro: Coroutine[Any, Any, Any]) -> Settled:
        try:
            return cls(await coro)
        except Rejected as exc:
            return cls(exc)

    def result(self) -> Any:
        if isinstance(self.value, Rejected):
            raise self.value
        return self.value


# A passing run takes seconds; shrinking a failure can take minutes (see the flash machine).
@pytest.mark.timeout(420)
def test_team_state_machine(redis_server: RedisServer) -> None:
    TeamMachine.redis_url = redis_server.url
    run_state_machine_as_test(TeamMachine, settings=SETTINGS)
