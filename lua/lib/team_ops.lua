-- lib/team_ops.lua: the order-creating operations of team campaigns: open a team, join one,
-- quick-join (open_team.lua, join_team.lua, quick_join.lua and batch.lua). Requires
-- lib/ops.lua (and what it requires); the conventions are the ones lib/ops.lua describes.

-- The one rule for a shopper taking a seat in open team t: the team open, unexpired, without
-- the user, with a free seat, then seat_blocked (lib/ops.lua) for the team's units per seat.
local function team_seat_blocked(ctx, m, t, user)
  if t.state ~= 'O' then return {TEAM_CLOSED, t.state} end
  if ctx.now >= t.expires then return {TEAM_CLOSED, 'expired'} end
  if member_index(t, user) then return {ALREADY_IN_TEAM} end
  if t.held + t.paid >= t.size then return {TEAM_FULL} end
  return seat_blocked(ctx, m, user, t.sku, t.qty)
end

-- Seat user in open team t: a held order until min(hold deadline, team expiry). Returns the
-- reply and the order's sequence number.
local function take_seat(ctx, m, t, user)
  if ctx.first[t.sku] ~= t then ctx.first[t.sku] = nil end  -- see op_quick
  touch_index(ctx, t)
  local o, seq = create_order(ctx, user, t.sku, t.qty, math.min(ctx.now + m.hold, t.expires),
    t.id)
  add_member(t, o.id, user)
  t.held = t.held + 1
  local raw = emit_order(ctx, o, 'user')
  return {OK, o.id, raw, 0, t.id, emit_team(ctx, t, 'user', 'team.joined', o.id), 0}, seq
end

-- Open a pending team led by user, with the leader's held order at the item's leader price
-- (if it has one): it must be paid before the campaign ends, as no team may open after the end
-- (docs/lifecycle.md#team). Returns the reply and the order's sequence number.
local function open_pending_team(ctx, m, user, sku, qty)
  local t = {id = ctx.cid .. '.t' .. redis.call('HINCRBY', ctx.k.meta, 'tseq', 1),
    leader = user, sku = sku, qty = qty, size = m.team_size, state = 'W', created = ctx.now,
    opened = 0, expires = 0, held = 0, paid = 0, version = 0, why = '', members = {},
    seats = {}}
  ctx.teams[t.id] = t
  local o, seq = create_order(ctx, user, sku, qty, math.min(ctx.now + m.hold, m.ends), t.id,
    leader_unit_price(ctx, sku))
  add_member(t, o.id, user)
  t.held = 1
  local raw = emit_order(ctx, o, 'user')
  return {OK, o.id, raw, 0, t.id, emit_team(ctx, t, 'user', nil, ''), 1}, seq
end

-- Open a pending team: the leader's units held like a flash order (open_team.lua).
local function op_open(ctx, user, sku, qty_arg, key)
  local qty = tonumber(qty_arg)
  local field = user .. ':' .. key
  local m, early = admit(ctx, user, field, 'o', sku .. ':' .. string.format('%d', qty), 'team',
    true)
  if early then return early end
  local blocked = seat_blocked(ctx, m, user, sku, qty)
  if blocked then return blocked end
  local reply, seq = open_pending_team(ctx, m, user, sku, qty)
  remember(ctx, field, 'o', seq)
  return reply
end

-- Take a seat in an open team (join_team.lua).
local function op_join(ctx, user, team_id, key)
  local field = user .. ':' .. key
  local m, early = admit(ctx, user, field, 'j', team_id, 'team', false)
  if early then return early end
  local t = ctx_team(ctx, team_id)
  if not t then return {NOT_FOUND} end
  local blocked = team_seat_blocked(ctx, m, t, user)
  if blocked then return blocked end

  local reply, seq = take_seat(ctx, m, t, user)
  remember(ctx, field, 'j', seq)
  return reply
end

-- Whether open team t leaves a seat taken now the campaign's time to pay (m.min_pay): quick-join
-- and the joinable list offer no team about to expire.
local function leaves_time_to_pay(ctx, m, t)
  return t.expires - ctx.now >= m.min_pay
end

-- Joinable index entries quick-join reads per ZRANGEBYLEX after the first (which usually fits,
-- so it is read alone: each entry read costs).
local QUICK_PAGE = 16

-- Seat user in t for a quick-join; `first` when t is the first entry of its sku's range.
local function quick_seat(ctx, m, t, user, field, first)
  local reply, seq = take_seat(ctx, m, t, user)
  remember(ctx, field, 'q', seq)
  ctx.first[t.sku] = first and t or nil
  return reply
end

-- The best open team of the sku that user may take a seat in (team_seat_blocked) and that leaves
-- time to pay, among the first ctx.scan entries of the index (fewest remaining seats, then
-- earliest expiry); returns it and whether it was the range's first entry.
local function best_team(ctx, m, user, sku)
  flush_index(ctx)
  local offset, page = 0, 1
  while offset < ctx.scan do
    page = math.min(page, ctx.scan - offset)
    local entries = redis.call('ZRANGEBYLEX', ctx.k.joinable, '[' .. sku .. '|',
      '[' .. sku .. '|~', 'LIMIT', offset, page)
    for i, entry in ipairs(entries) do
      local t = ctx_team(ctx, string.match(entry, '[^|]+$'))
      if t and leaves_time_to_pay(ctx, m, t) and not team_seat_blocked(ctx, m, t, user) then
        return t, offset == 0 and i == 1
      end
    end
    if #entries < page then return nil end
    offset, page = offset + page, QUICK_PAGE
  end
  return nil
end

-- Seat the user in the best open team of the sku they can afford that leaves time to pay, else
-- open a new one-unit team (quick_join.lua).
local function op_quick(ctx, user, sku, key)
  local field = user .. ':' .. key
  local m, early = admit(ctx, user, field, 'q', sku, 'team', false)
  if early then return early end

  -- A team seated as the first entry of the sku's range is still first afterwards (one
  -- remaining seat fewer sorts earlier) while it has a free seat, unless another team of the
  -- sku took a seat since (take_seat forgets it then): no need to read the index again.
  local first = ctx.first[sku]
  if first and leaves_time_to_pay(ctx, m, first) and not team_seat_blocked(ctx, m, first, user)
  then
    return quick_seat(ctx, m, first, user, field, true)
  end
  local t, is_first = best_team(ctx, m, user, sku)
  if t then return quick_seat(ctx, m, t, user, field, is_first) end

  local closed = campaign_closed(m, ctx.now, 'team', true)
  if closed then return closed end
  local blocked = seat_blocked(ctx, m, user, sku, 1)
  if blocked then return blocked end
  local reply, seq = open_pending_team(ctx, m, user, sku, 1)
  remember(ctx, field, 'q', seq)
  return reply
end
