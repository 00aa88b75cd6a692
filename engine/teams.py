"""Team-join (group-buy, 拼团) operations: open, join, quick-join, and the team views.

Payment and cancellation of team orders go through ``engine.orders`` (``pay``, ``cancel``): the
same scripts open a team on the leader's payment, make it succeed on the last paid seat and
free a held seat. Team expiry, failure refunds and leader-hold expiry run in the reaper
(docs/lifecycle.md#team).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from engine.archive import archived_refusal
from engine.coalesce import Coalescer
from engine.errors import Archived, NotFound
from engine.keys import campaign_of_team, check_id, check_key, keys_of
from engine.models import MAX_UNITS, Order, Team, TeamSeatResult, TeamState, check_int
from engine.runtime import Runtime
from engine.scripts import OPEN, Call, accepted, guarded

__all__ = [
    "MemberView",
    "ShareState",
    "TeamView",
    "Teams",
    "mask_user",
]

MAX_LIST = 100


class ShareState(StrEnum):
    """What the page behind a shared team link shows (docs/lifecycle.md#share-view)."""

    PENDING = "pending"
    OPEN = "open"
    FULL_AWAITING_PAYMENT = "full_awaiting_payment"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DISSOLVED = "dissolved"
    CAMPAIGN_INVALIDATED = "campaign_invalidated"


@dataclass(frozen=True, slots=True)
class MemberView:
    """One seat on the share page, with the user id masked."""

    name: str
    leader: bool
    paid: bool


@dataclass(frozen=True, slots=True)
class TeamView:
    """The share view of one team for one viewer; ``auto_succeeded`` when the team succeeded
    automatically at its expiry (or its time ran out and it is about to: the campaign's
    automatic success, docs/lifecycle.md#team)."""

    team: Team
    share_state: ShareState
    members: tuple[MemberView, ...]
    viewer_can_join: bool
    viewer_in_team: bool
    auto_succeeded: bool = False


def mask_user(user_id: str) -> str:
    """``shopper-1234`` -> ``s***4``: enough to recognise a friend, not to identify anyone."""
    return user_id[0] + "***" + (user_id[-1] if len(user_id) > 1 else "")


class Teams:
    """Team-join on top of the flash-sale core (docs/lifecycle.md#team)."""

    def __init__(self, rt: Runtime, coalescer: Coalescer) -> None:
        self._rt = rt
        self._scripts = rt.scripts
        self._coalescer = coalescer

    async def open(
        self, campaign_id: str, leader_id: str, sku: str, qty: int, idempotency_key: str
    ) -> TeamSeatResult:
        """Open a pending team: the leader's units are held; paying opens the team."""
        keys = keys_of(campaign_id)
        check_id(leader_id, "user_id")
        check_id(sku, "sku")
        check_key(idempotency_key, "idempotency_key")
        check_int(qty, "qty", 1, MAX_UNITS)
        call = Call(OPEN, leader_id, sku, "", qty, idempotency_key)
        try:
            outcome = accepted(await self._scripts.one(keys.campaign_id, call))
        except Archived:
            raise await archived_refusal(self._rt, keys.campaign_id, "open") from None
        assert isinstance(outcome, TeamSeatResult)  # OPEN decodes to one
        return outcome

    async def join(self, team_id: str, user_id: str, idempotency_key: str) -> TeamSeatResult:
        """Take a seat in an open team; it is held until paid (``engine.orders.pay``)."""
        campaign_id = campaign_of_team(team_id)
        keys = keys_of(campaign_id)
        check_id(user_id, "user_id")
        check_key(idempotency_key, "idempotency_key")
        try:
            outcome = await self._coalescer.join(
                keys.campaign_id, user_id, team_id, idempotency_key
            )
        except Archived:
            raise await archived_refusal(self._rt, keys.campaign_id, "join", team_id) from None
        return accepted(outcome)

    async def quick_join(
        self, campaign_id: str, user_id: str, sku: str, idempotency_key: str
    ) -> TeamSeatResult:
        """Seat the user in the best open team of the sku that leaves the campaign's time to
        pay (``Campaign.quick_join_min_ms``), or open a new one (``opened``)."""
        keys = keys_of(campaign_id)
        check_id(user_id, "user_id")
        check_id(sku, "sku")
        check_key(idempotency_key, "idempotency_key")
        try:
            outcome = await self._coalescer.quick_join(
                keys.campaign_id, user_id, sku, idempotency_key
            )
        except Archived:
            raise await archived_refusal(self._rt, keys.campaign_id, "quick") from None
        return accepted(outcome)

    async def joinable(
        self, campaign_id: str, sku: str, viewer: str | None = None, limit: int = 20
    ) -> list[Team]:
        """Open teams of the sku with a free seat and the campaign's time to pay left
        (``Campaign.quick_join_min_ms``), without the viewer's own; fewest remaining seats
        first, then earliest expiry (read from team records, not orders)."""
        keys = keys_of(campaign_id)
        check_id(sku, "sku")
        if viewer is not None:
            check_id(viewer, "viewer")
        check_int(limit, "limit", 1, MAX_LIST)
        try:
            return await self._scripts.list_teams(keys.campaign_id, sku, viewer, limit)
        except NotFound:
            if await self._rt.store.archive_of(keys.campaign_id) is None:
                raise
            return []  # archived: over, so no team is joinable

    async def get(self, team_id: str) -> Team:
        """The team's current record: from Redis while the team is there, else from the
        durable store (an archived campaign's teams)."""
        keys = keys_of(campaign_of_team(team_id))
        record = await guarded(self._rt.redis.hget(keys.teams, team_id))
        if record is not None:
            return Team.from_record(team_id, record)
        stored = await self._rt.store.get_team(team_id)
        if stored is None:
            raise NotFound(f"no team {team_id}", id=team_id)
        return stored

    async def orders(self, team_id: str) -> list[Order]:
        """The orders of the team's seats, leader first (held or paid; refunded once a team
        failed): from Redis while they are there, else from the durable store."""
        team = await self.get(team_id)
        ids = [seat.order_id for seat in team.seats]
        if not ids:
            return []
        keys = keys_of(team.campaign_id)
        records: list[str | None] = await guarded(self._rt.redis.hmget(keys.orders, ids))
        if any(records):
            return [Order.from_record(i, r) for i, r in zip(ids, records, strict=True) if r]
        stored = {o.order_id: o for o in await self._rt.store.team_orders(team_id)}
        return [stored[i] for i in ids if i in stored]

    async def view(self, team_id: str, viewer: str | None = None) -> TeamView:
        """The share view: state, seats, masked members, and whether the viewer can join."""
        if viewer is not None:
            check_id(viewer, "viewer")
        team = await self.get(team_id)
        orders = {order.order_id: order for order in await self.orders(team_id)}
        invalidated, auto_min = await self._options(team.campaign_id)
        now = await self._rt.now()
        in_team = viewer is not None and any(seat.user_id == viewer for seat in team.seats)
        state, auto = _share_state(team, invalidated, auto_min, now)
        members = tuple(
            MemberView(
                name=mask_user(seat.user_id),
                leader=i == 0,
                paid=orders[seat.order_id].state.value in ("paid", "refunded")
                if seat.order_id in orders
                else False,
            )
            for i, seat in enumerate(team.seats)
        )
        can_join = state is ShareState.OPEN and viewer is not None and not in_team
        return TeamView(team, state, members, can_join, in_team, auto)

    async def _options(self, campaign_id: str) -> tuple[bool, int]:
        """Whether the campaign was invalidated, and the paid seats that make an expiring
        team succeed (0: the option is off): Redis's definition, else SQL's (archived)."""
        meta = keys_of(campaign_id).meta
        invalid, auto = await guarded(self._rt.redis.hmget(meta, "invalid", "auto"))
        if invalid is not None:
            return int(invalid) > 0, int(auto or 0)
        campaign = await self._rt.store.get_campaign(campaign_id)
        if campaign is None:
            return False, 0
        return campaign.invalidated_at is not None, campaign.auto_success_min_paid or 0


def _share_state(
    team: Team, invalidated: bool, auto_min: int, now: datetime
) -> tuple[ShareState, bool]:
    """The team's share state, and whether it succeeded (or is about to) automatically."""
    if invalidated and team.state is not TeamState.SUCCEEDED:
        return ShareState.CAMPAIGN_INVALIDATED, False
    if team.state is TeamState.OPEN:
        if team.expires_at is not None and now >= team.expires_at:
            # Its time ran out; the reaper is about to end it (docs/lifecycle.md#team).
            if auto_min and team.paid >= auto_min:
                return ShareState.SUCCEEDED, True
            return ShareState.FAILED, False
        state = ShareState.OPEN if team.remaining > 0 else ShareState.FULL_AWAITING_PAYMENT
        return state, False
    return ShareState(team.state.value), team.auto_succeeded
