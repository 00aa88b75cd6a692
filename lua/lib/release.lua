-- lib/release.lua: ending held orders and ending teams (failure, automatic success), shared by
-- cancel_order.lua, expire_orders.lua and expire_teams.lua. Requires lib/ctx.lua (and what it
-- requires).

-- End a held order (cancelled C or expired E): stock back, the user's units freed, its
-- deadline unindexed.
local function release_hold(ctx, o, state, reason)
  move(ctx, o.sku, 'h', 'a', o.qty)
  add_units(ctx, o.user, -o.qty)
  unschedule(ctx, o.id)
  o.state = state
  return emit_order(ctx, o, reason)
end

-- A held seat ended (cancelled or expired): free it; a pending team whose leader's hold ended
-- is dissolved. Call after the order itself was released.
local function seat_released(ctx, o, reason)
  local t = ctx_team(ctx, o.team)
  if not t then return end
  if t.state == 'W' then
    t.state = 'D'
    t.held = 0
    if reason == 'user' then
      t.why = 'leader_cancelled'
    elseif reason == 'invalidated' then
      t.why = 'invalidated'
    else
      t.why = 'leader_unpaid'
    end
    emit_team(ctx, t, reason, nil, o.id)
    return
  end
  local i = member_index(t, o.user)
  if t.state ~= 'O' or not i or t.members[i].order ~= o.id then return end
  touch_index(ctx, t)
  remove_member(t, i)
  t.held = t.held - 1
  emit_team(ctx, t, reason, 'team.seat_released', o.id)
end

-- Fail an open team: refund every paid seat (stock back), expire every held seat (cancel it
-- when the campaign was invalidated).
local function fail_team(ctx, t, why)
  touch_index(ctx, t)
  redis.call('ZREM', ctx.k.team_deadlines, t.id)
  for _, seat in ipairs(t.members) do
    local o = ctx_order(ctx, seat.order)
    if o and o.state == 'P' then
      move(ctx, o.sku, 'p', 'a', o.qty)
      add_units(ctx, o.user, -o.qty)
      o.state = 'R'
      emit_order(ctx, o, 'team_failed')
    elseif o and o.state == 'H' then
      release_hold(ctx, o, why == 'invalidated' and 'C' or 'E', 'team_failed')
    end
  end
  t.state = 'F'
  t.why = why
  t.held = 0
  emit_team(ctx, t, why, nil, nil)
end

-- An open team whose time ran out with at least the campaign's `auto` paid seats (a campaign
-- option; never on invalidation) succeeds with the seats paid so far: every held seat is
-- released as a failing team's would be (its order expired, its units back on sale) and leaves
-- the team; the paid seats stand. The team's `why` says it succeeded automatically ('auto').
local function auto_succeed(ctx, t)
  touch_index(ctx, t)
  redis.call('ZREM', ctx.k.team_deadlines, t.id)
  for i = #t.members, 1, -1 do
    local o = ctx_order(ctx, t.members[i].order)
    if o and o.state == 'H' then
      release_hold(ctx, o, 'E', 'team_succeeded')
      remove_member(t, i)
    end
  end
  t.state = 'S'
  t.why = 'auto'
  t.held = 0
  emit_team(ctx, t, 'auto', nil, nil)
end
