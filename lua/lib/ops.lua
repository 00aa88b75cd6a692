-- lib/ops.lua: the order-creating operations, shared by their one-call scripts
-- (reserve_stock.lua, open_team.lua, join_team.lua, quick_join.lua) and by batch.lua, which
-- runs many of them for one campaign in one EVALSHA (request coalescing). Each returns exactly
-- the reply its script documents. Requires lib/ctx.lua (and what it requires).
--
-- Every one of these scripts starts with the same ARGV: campaign id, rate limit (attempts
-- per user and second, 0 = off), idempotency TTL (s), quick-join scan bound. Then each request
-- is the same five fields in the same order everywhere (ARGV, batch.lua's packed string,
-- the op_* functions, engine/scripts.py): op, user id, sku or team id, qty, idempotency key.
-- Every op takes the call's context first, then this request's rate-limit key `rl` (all but
-- op_probe, which counts no attempt), then the request's fields in that order.

-- The context of an order-creating script making at most n orders.
local function creation_ctx(n)
  return new_ctx(order_keys(), ARGV[1], n, tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4]))
end

-- Fixed one-second window of attempts per user; returns the window's remaining ms when over.
local function rate_limited(rl_key, per_second)
  if per_second <= 0 then return nil end
  local n = redis.call('INCR', rl_key)
  if n == 1 then redis.call('PEXPIRE', rl_key, 1000) end
  if n > per_second then
    local ttl = redis.call('PTTL', rl_key)
    if ttl < 0 then ttl = 1000 end
    return ttl
  end
  return nil
end

-- Idempotency records: the campaign's `idem` hash, field "<user>:<key>" -> "<op><order seq>"
-- (op: r reserve, o open team, j join, q quick-join; the order id is "<cid>.o<seq>"). A retry
-- must repeat the op and the parameters its order record keeps: sku and qty (r, o), the team
-- (j), the sku (q). The hash expires `ttl` seconds after its last write (finish), so every
-- record lives at least that long.
-- Returns the original reply (replayed = 1), {IDEMPOTENCY_MISMATCH}, or nil (a new request).
local function replay(ctx, field, op, want)
  local prior = ctx.idem[field] or redis.call('HGET', ctx.k.idem, field)
  if not prior then return nil end
  local id = ctx.cid .. '.o' .. string.sub(prior, 2)
  local raw = ctx.orders[id] or redis.call('HGET', ctx.k.orders, id)
  local f = split(raw)
  local got = f[2] .. ':' .. f[3]
  if op == 'j' then got = f[10] elseif op == 'q' then got = f[2] end
  if string.sub(prior, 1, 1) ~= op or got ~= want then return {IDEMPOTENCY_MISMATCH} end
  return seat_reply(ctx, id, raw, 1)
end

local function remember(ctx, field, op, seq)
  ctx.idem[field] = op .. seq
end

-- The one campaign gate of the ops: nil while campaign m takes orders of `kind`, else the
-- rejection. `opening` (a reservation or a new team) also needs the campaign active; a seat
-- in an open team is taken until the team's expiry, after the campaign's end too
-- (docs/lifecycle.md#team).
local function campaign_closed(m, now, kind, opening)
  if not m then return {NOT_FOUND} end
  if m.invalid > 0 then return {INVALIDATED} end
  if opening then
    if now < m.starts then return {NOT_STARTED, string.format('%d', m.starts)} end
    if now >= m.ends then return {ENDED, string.format('%d', m.ends)} end
  end
  if m.kind ~= kind then return {WRONG_KIND} end
  return nil
end

-- The one rule for a shopper taking qty more units of sku (a reservation, a new team, a
-- seat): nil when the per-user limit and the stock allow it, else the rejection.
local function seat_blocked(ctx, m, user, sku, qty)
  local units = user_units(ctx, user)
  if units + qty > m.limit then return {LIMIT_EXCEEDED, m.limit - units} end
  local available = units_available(ctx, sku)
  if available < 0 then return {NOT_FOUND, sku} end
  if available < qty then return {SOLD_OUT, available} end
  return nil
end

-- ... and in open team t: the team open, unexpired, without the user, with a free seat.
local function team_seat_blocked(ctx, m, t, user)
  if t.state ~= 'O' then return {TEAM_CLOSED, t.state} end
  if ctx.now >= t.expires then return {TEAM_CLOSED, 'expired'} end
  if member_index(t, user) then return {ALREADY_IN_TEAM} end
  if t.held + t.paid >= t.size then return {TEAM_FULL} end
  return seat_blocked(ctx, m, user, t.sku, t.qty)
end

-- A new held order of qty units of sku for user until `deadline` (of team_id, if given);
-- returns the order and its sequence number.
local function create_order(ctx, user, sku, qty, deadline, team_id)
  move(ctx, sku, 'a', 'h', qty)
  add_units(ctx, user, qty)
  local seq = next_seq(ctx)
  local id = ctx.cid .. '.o' .. seq
  schedule(ctx, deadline, id)
  return {id = id, user = user, sku = sku, qty = qty, amount = qty * unit_price(ctx, sku),
    state = 'H', created = ctx.now, deadline = deadline, version = 0,
    kind = team_id and 't' or 'f', team = team_id or '', payref = ''}, seq
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

-- Open a pending team led by user, with the leader's held order: it must be paid before the
-- campaign ends, as no team may open after the end (docs/lifecycle.md#team). Returns the
-- reply and the order's sequence number.
local function open_pending_team(ctx, m, user, sku, qty)
  local t = {id = ctx.cid .. '.t' .. redis.call('HINCRBY', ctx.k.meta, 'tseq', 1),
    leader = user, sku = sku, qty = qty, size = m.team_size, state = 'W', created = ctx.now,
    opened = 0, expires = 0, held = 0, paid = 0, version = 0, why = '', members = {},
    seats = {}}
  ctx.teams[t.id] = t
  local o, seq = create_order(ctx, user, sku, qty, math.min(ctx.now + m.hold, m.ends), t.id)
  add_member(t, o.id, user)
  t.held = 1
  local raw = emit_order(ctx, o, 'user')
  return {OK, o.id, raw, 0, t.id, emit_team(ctx, t, 'user', nil, ''), 1}, seq
end

-- Reserve qty units of one item of a flash campaign (reserve_stock.lua).
local function op_reserve(ctx, rl, user, sku, qty_arg, key)
  local qty = tonumber(qty_arg)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'r', sku .. ':' .. string.format('%d', qty))
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  local closed = campaign_closed(m, ctx.now, 'flash', true)
  if closed then return closed end
  if not unit_price(ctx, sku) then return {NOT_FOUND, sku} end
  local blocked = seat_blocked(ctx, m, user, sku, qty)
  if blocked then return blocked end

  local o, seq = create_order(ctx, user, sku, qty, ctx.now + m.hold, nil)
  remember(ctx, field, 'r', seq)
  return {OK, o.id, emit_order(ctx, o, 'user'), 0}
end

-- Open a pending team: the leader's units held like a flash order (open_team.lua).
local function op_open(ctx, rl, user, sku, qty_arg, key)
  local qty = tonumber(qty_arg)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'o', sku .. ':' .. string.format('%d', qty))
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  local closed = campaign_closed(m, ctx.now, 'team', true)
  if closed then return closed end
  local blocked = seat_blocked(ctx, m, user, sku, qty)
  if blocked then return blocked end
  local reply, seq = open_pending_team(ctx, m, user, sku, qty)
  remember(ctx, field, 'o', seq)
  return reply
end

-- Take a seat in an open team (join_team.lua).
local function op_join(ctx, rl, user, team_id, key)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'j', team_id)
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  local closed = campaign_closed(m, ctx.now, 'team', false)
  if closed then return closed end
  local t = ctx_team(ctx, team_id)
  if not t then return {NOT_FOUND} end
  local blocked = team_seat_blocked(ctx, m, t, user)
  if blocked then return blocked end

  local reply, seq = take_seat(ctx, m, t, user)
  remember(ctx, field, 'j', seq)
  return reply
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

-- The best open team of the sku that user may take a seat in (team_seat_blocked), among the
-- first ctx.scan entries of the index; returns it and whether it was the range's first entry.
local function best_team(ctx, m, user, sku)
  flush_index(ctx)
  local offset, page = 0, 1
  while offset < ctx.scan do
    page = math.min(page, ctx.scan - offset)
    local entries = redis.call('ZRANGEBYLEX', ctx.k.joinable, '[' .. sku .. '|',
      '[' .. sku .. '|~', 'LIMIT', offset, page)
    for i, entry in ipairs(entries) do
      local t = ctx_team(ctx, string.match(entry, '[^|]+$'))
      if t and not team_seat_blocked(ctx, m, t, user) then
        return t, offset == 0 and i == 1
      end
    end
    if #entries < page then return nil end
    offset, page = offset + page, QUICK_PAGE
  end
  return nil
end

-- Seat the user in the best open team of the sku they can afford, else open a new one-unit
-- team (quick_join.lua).
local function op_quick(ctx, rl, user, sku, key)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'q', sku)
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  local closed = campaign_closed(m, ctx.now, 'team', false)
  if closed then return closed end

  -- A team seated as the first entry of the sku's range is still first afterwards (one
  -- remaining seat fewer sorts earlier) while it has a free seat, unless another team of the
  -- sku took a seat since (take_seat forgets it then): no need to read the index again.
  local first = ctx.first[sku]
  if first and not team_seat_blocked(ctx, m, first, user) then
    return quick_seat(ctx, m, first, user, field, true)
  end
  local t, is_first = best_team(ctx, m, user, sku)
  if t then return quick_seat(ctx, m, t, user, field, is_first) end

  closed = campaign_closed(m, ctx.now, 'team', true)
  if closed then return closed end
  local blocked = seat_blocked(ctx, m, user, sku, 1)
  if blocked then return blocked end
  local reply, seq = open_pending_team(ctx, m, user, sku, 1)
  remember(ctx, field, 'q', seq)
  return reply
end

-- The sold-out fast path (engine/flash.py): the item was sold out a moment ago, so only an
-- idempotent replay can still succeed. Returns the replay (or the key mismatch), else
-- {5, 0} sold out, without touching stock, limits or the rate counter.
local function op_probe(ctx, user, sku, qty_arg, key)
  local prior = replay(ctx, user .. ':' .. key, 'r',
    sku .. ':' .. string.format('%d', tonumber(qty_arg)))
  if prior then return prior end
  return {SOLD_OUT, 0}
end
