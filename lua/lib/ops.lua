-- lib/ops.lua: the order-creating operations as functions, shared by their one-call scripts
-- (reserve_stock.lua, open_team.lua, join_team.lua, quick_join.lua) and by batch.lua, which
-- runs many of them for one campaign in one EVALSHA (request coalescing). Each returns exactly
-- the reply its script documents. Requires lib/common.lua and lib/team.lua.
--
-- Every op takes the call's context (new_ctx), this request's idempotency key `key` and
-- rate-limit key `rl`, then its own arguments. A script runs its ops through run_ops.

-- The context of one script call, shared by its n ops. It reads the Redis clock once, and the
-- campaign's meta, item prices, available units, users' units and team records once each,
-- then keeps them as the ops change them; the writes nobody reads back during the call (the
-- inventory and users counters, order, team and idempotency records, the deadline index) are
-- made once per key at the end (finish), the outbox events at once, and the joinable index
-- before quick-join reads it and at the end (flush_index).
-- Sound because a script runs atomically: nothing but these ops touches those keys meanwhile.
-- `rate` is attempts per second (0 = off), `ttl` the idempotency TTL in seconds.
local function new_ctx(k, cid, n, rate, ttl)
  local now = now_ms()
  return {k = k, cid = cid, n = n, rate = rate, ttl = ttl, now = now,
    at = string.format('%d', now), meta = nil, prices = {}, avail = {}, held = {}, units = {},
    dirty_users = {}, teams = {}, team_raws = {}, orders = {}, idem = {}, deadlines = {},
    reindex = {}, first = {}, enc = {}, seq = 0, seq_last = 0}
end

local function ctx_meta(ctx)
  if not ctx.meta then ctx.meta = load_meta(ctx.k.meta) end
  return ctx.meta
end

-- A number field of a hash, read from Redis once per call: cache[name], else `default`.
local function hget_once(cache, name, hash, field, default)
  local v = cache[name]
  if v == nil then
    v = tonumber(redis.call('HGET', hash, field)) or default
    cache[name] = v
  end
  return v
end

-- Unit price of sku, nil for an unknown sku.
local function unit_price(ctx, sku)
  return hget_once(ctx.prices, sku, ctx.k.inv, '$:' .. sku, false) or nil
end

-- Available units of sku, -1 for an unknown sku.
local function units_available(ctx, sku)
  return hget_once(ctx.avail, sku, ctx.k.inv, 'a:' .. sku, -1)
end

-- The user's held + paid units in the campaign (the per-user limit).
local function user_units(ctx, user)
  return hget_once(ctx.units, user, ctx.k.users, user, 0)
end

local function ctx_team(ctx, id)
  local t = ctx.teams[id]
  if t == nil then
    t = load_team(ctx.k.teams, id) or false
    ctx.teams[id] = t
  end
  return t or nil
end

-- The next order sequence number. Ids are taken from the campaign's 'oseq' counter a block of
-- n at a time (one op makes at most one order); finish() returns the unused rest.
local function next_seq(ctx)
  if ctx.seq == ctx.seq_last then
    ctx.seq_last = redis.call('HINCRBY', ctx.k.meta, 'oseq', ctx.n)
    ctx.seq = ctx.seq_last - ctx.n
  end
  ctx.seq = ctx.seq + 1
  return ctx.seq
end

-- A new state of order o (its version up): the outbox event now, the record at finish.
local function emit_order(ctx, o)
  o.version = o.version + 1
  local raw = encode_order(o)
  redis.call('XADD', ctx.k.events, '*', 'type', STATE_EVENT[o.state], 'order', o.id,
    'record', raw, 'at', ctx.at, 'reason', 'user')
  ctx.orders[o.id] = raw
  return raw
end

-- encode_team(t) for the ops, which only ever add seats to a team: the fields before `held`
-- and the seats encoded so far are kept per team for the call.
local function encode_seated(ctx, t)
  local c = ctx.enc[t]
  if not c then
    c = {head = table.concat({t.leader, t.sku, string.format('%d', t.qty), t.size, t.state,
      string.format('%d', t.created), string.format('%d', t.opened),
      string.format('%d', t.expires)}, '|'), n = 0, seats = {}}
    ctx.enc[t] = c
  end
  for i = c.n + 1, #t.members do
    local m = t.members[i]
    c.seats[i] = m.order .. '=' .. m.user
  end
  c.n = #t.members
  return c.head .. '|' .. t.held .. '|' .. t.paid .. '|' .. t.version .. '|' .. t.why .. '|' ..
    table.concat(c.seats, ',')
end

-- A new state of team t (its version up): the outbox event now (`etype` defaults to the
-- state's own event), the record at finish.
local function emit_team(ctx, t, etype, order_id)
  t.version = t.version + 1
  local raw = encode_seated(ctx, t)
  redis.call('XADD', ctx.k.events, '*', 'type', etype or TEAM_EVENT[t.state], 'team', t.id,
    'record', raw, 'order', order_id, 'at', ctx.at, 'reason', 'user')
  ctx.team_raws[t.id] = raw
  return raw
end

-- Idempotency records: the campaign's `idem` hash, field "<user>:<key>" -> "<op><order seq>"
-- (op: r reserve, o open team, j join, q quick-join; the order id is "<cid>.o<seq>"). A retry
-- must repeat the op and the parameters its order record keeps: sku and qty (r, o), the team
-- (j), the sku (q). The hash expires `ttl` seconds after its last write (finish), so every
-- record lives at least that long.
-- Returns the original reply (replayed = 1), {IDEMPOTENCY_MISMATCH}, or nil (a new request).
local function replay(ctx, field, op, want)
  local k = ctx.k
  local prior = ctx.idem[field] or redis.call('HGET', k.idem, field)
  if not prior then return nil end
  local id = ctx.cid .. '.o' .. string.sub(prior, 2)
  local raw = ctx.orders[id] or redis.call('HGET', k.orders, id)
  local f = split(raw)
  local got = f[2] .. ':' .. f[3]
  if op == 'j' then got = f[10] elseif op == 'q' then got = f[2] end
  if string.sub(prior, 1, 1) ~= op or got ~= want then return {IDEMPOTENCY_MISMATCH} end
  -- This call's records first: its writes wait for finish().
  return seat_reply(id, raw, 1,
    function(team) return ctx.team_raws[team] or redis.call('HGET', k.teams, team) end)
end

local function remember(ctx, field, op, seq)
  ctx.idem[field] = op .. seq
end

-- Hold qty units of sku for user: available -> held, the user's units up.
local function hold_units(ctx, user, sku, qty)
  ctx.avail[sku] = units_available(ctx, sku) - qty
  ctx.held[sku] = (ctx.held[sku] or 0) + qty
  ctx.units[user] = user_units(ctx, user) + qty
  ctx.dirty_users[user] = true
end

-- Team t is about to change seats: remember its joinable entry as it was before this call.
local function touch_index(ctx, t)
  if ctx.reindex[t] == nil then ctx.reindex[t] = t.state == 'O' and index_entry(t) or false end
end

-- Bring the joinable index up to date with the teams the ops changed (lib/team.lua unindex
-- and reindex, once per team).
local function flush_index(ctx)
  for t, old in pairs(ctx.reindex) do
    local new = t.state == 'O' and t.held + t.paid < t.size and index_entry(t)
    if old ~= new then
      if old then redis.call('ZREM', ctx.k.joinable, old) end
      if new then redis.call('ZADD', ctx.k.joinable, 0, new) end
    end
  end
  ctx.reindex = {}
end

-- Write a field -> value map into a hash, a bounded number of fields per HSET.
local function hset_map(key, map)
  local args, n = {}, 0
  for field, value in pairs(map) do
    args[n + 1], args[n + 2] = field, value
    n = n + 2
    if n >= 400 then
      redis.call('HSET', key, unpack(args, 1, n))
      n = 0
    end
  end
  if n > 0 then redis.call('HSET', key, unpack(args, 1, n)) end
end

-- After the last op of a call: the deferred writes, the unused order ids back.
local function finish(ctx)
  local k = ctx.k
  flush_index(ctx)
  for sku, qty in pairs(ctx.held) do
    redis.call('HINCRBY', k.inv, 'a:' .. sku, -qty)
    redis.call('HINCRBY', k.inv, 'h:' .. sku, qty)
    -- The first time an item's available units reach 0: the KPI "time to sell out".
    if ctx.avail[sku] == 0 then redis.call('HSETNX', k.inv, 'out:' .. sku, ctx.at) end
  end
  local units = {}
  for user in pairs(ctx.dirty_users) do units[user] = string.format('%d', ctx.units[user]) end
  hset_map(k.users, units)
  hset_map(k.orders, ctx.orders)
  hset_map(k.teams, ctx.team_raws)
  local d = ctx.deadlines
  for i = 1, #d, 400 do redis.call('ZADD', k.deadlines, unpack(d, i, math.min(i + 399, #d))) end
  if next(ctx.idem) then
    hset_map(k.idem, ctx.idem)
    redis.call('EXPIRE', k.idem, ctx.ttl)
  end
  if ctx.seq < ctx.seq_last then
    redis.call('HSET', k.meta, 'oseq', string.format('%d', ctx.seq))
  end
end

-- Run `ops` (a function returning the script's reply), then finish(ctx) even when an op
-- raised an error (re-raised after): the writes of the ops before it are never lost.
local function run_ops(ctx, ops)
  local ok, result = pcall(ops)
  finish(ctx)
  if not ok then error(result, 0) end
  return result
end

-- Per-user limit and stock for one more seat of qty units of sku: nil or {code, detail}.
local function seat_blocked(ctx, m, user, sku, qty)
  local units = user_units(ctx, user)
  if units + qty > m.limit then return {LIMIT_EXCEEDED, m.limit - units} end
  local available = units_available(ctx, sku)
  if available < 0 then return {NOT_FOUND, sku} end
  if available < qty then return {SOLD_OUT, available} end
  return nil
end

-- New held order for a seat (or the leader's) on team t, deadline capped by team expiry;
-- returns the order and its sequence number.
local function new_team_order(ctx, m, t, user)
  local now = ctx.now
  hold_units(ctx, user, t.sku, t.qty)
  local seq = next_seq(ctx)
  local id = ctx.cid .. '.o' .. seq
  local deadline = now + m.hold
  -- A member pays before the team expires; a leader before the campaign ends (no team may
  -- open after the end, seed 004 §1.2).
  if t.state == 'O' and t.expires < deadline then deadline = t.expires end
  if t.state == 'W' and m.ends < deadline then deadline = m.ends end
  local o = {id = id, user = user, sku = t.sku, qty = t.qty,
    amount = t.qty * unit_price(ctx, t.sku), state = 'H', created = now, deadline = deadline,
    version = 0, kind = 't', team = t.id, payref = ''}
  local d = ctx.deadlines
  d[#d + 1], d[#d + 2] = deadline, id
  t.members[#t.members + 1] = {order = id, user = user}
  t.held = t.held + 1
  return o, seq
end

-- Why user cannot take a seat in team t now: nil, or the rejection reply.
local function join_blocked(ctx, m, t, user)
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
  local o, seq = new_team_order(ctx, m, t, user)
  local raw = emit_order(ctx, o)
  return {OK, o.id, raw, 0, t.id, emit_team(ctx, t, 'team.joined', o.id), 0}, seq
end

-- Open a pending team led by user, with the leader's held order. Returns the reply and the
-- order's sequence number.
local function open_pending_team(ctx, m, user, sku, qty)
  local k = ctx.k
  local t = {id = ctx.cid .. '.t' .. redis.call('HINCRBY', k.meta, 'tseq', 1), leader = user,
    sku = sku, qty = qty, size = m.team_size, state = 'W', created = ctx.now, opened = 0,
    expires = 0, held = 0, paid = 0, version = 0, why = '', members = {}}
  ctx.teams[t.id] = t
  local o, seq = new_team_order(ctx, m, t, user)
  local raw = emit_order(ctx, o)
  return {OK, o.id, raw, 0, t.id, emit_team(ctx, t, nil, ''), 1}, seq
end

-- Reserve qty units of one item of a flash campaign (reserve_stock.lua).
local function op_reserve(ctx, key, rl, user, sku, qty_arg)
  local k, qty = ctx.k, tonumber(qty_arg)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'r', sku .. ':' .. string.format('%d', qty))
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  local closed = gate_reply(m, ctx.now, 'flash')
  if closed then return closed end
  local price = unit_price(ctx, sku)
  if not price then return {NOT_FOUND, sku} end
  local units = user_units(ctx, user)
  if units + qty > m.limit then return {LIMIT_EXCEEDED, m.limit - units} end
  local available = units_available(ctx, sku)
  if available < qty then return {SOLD_OUT, available} end

  hold_units(ctx, user, sku, qty)
  local seq = next_seq(ctx)
  local id = ctx.cid .. '.o' .. seq
  local o = {id = id, user = user, sku = sku, qty = qty, amount = qty * price, state = 'H',
    created = ctx.now, deadline = ctx.now + m.hold, version = 0, kind = 'f', team = '',
    payref = ''}
  local d = ctx.deadlines
  d[#d + 1], d[#d + 2] = o.deadline, id
  remember(ctx, field, 'r', seq)
  return {OK, id, emit_order(ctx, o), 0}
end

-- Open a pending team: the leader's units held like a flash order (open_team.lua).
local function op_open(ctx, key, rl, user, sku, qty_arg)
  local qty = tonumber(qty_arg)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'o', sku .. ':' .. string.format('%d', qty))
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  local closed = gate_reply(m, ctx.now, 'team')
  if closed then return closed end
  local blocked = seat_blocked(ctx, m, user, sku, qty)
  if blocked then return blocked end
  local reply, seq = open_pending_team(ctx, m, user, sku, qty)
  remember(ctx, field, 'o', seq)
  return reply
end

-- Take a seat in an open team (join_team.lua).
local function op_join(ctx, key, rl, user, team_id)
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'j', team_id)
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  if not m then return {NOT_FOUND} end
  if m.invalid > 0 then return {INVALIDATED} end
  if m.kind ~= 'team' then return {WRONG_KIND} end
  local t = ctx_team(ctx, team_id)
  if not t then return {NOT_FOUND} end
  local blocked = join_blocked(ctx, m, t, user)
  if blocked then return blocked end

  local reply, seq = take_seat(ctx, m, t, user)
  remember(ctx, field, 'j', seq)
  return reply
end

-- Joinable index entries quick-join reads per ZRANGEBYLEX after the first (which usually fits,
-- so it is read alone: each entry read costs).
local QUICK_PAGE = 16

-- Seat the user in the best open team of the sku they can afford, else open a new one-unit
-- team (quick_join.lua); `scan` bounds the index entries looked at.
-- Whether quick-join may seat user in team t: open, unexpired, not a member, a free seat,
-- the user's limit and the stock allow t's units per seat.
local function quick_fits(ctx, m, t, user)
  return t.state == 'O' and ctx.now < t.expires and not member_index(t, user)
    and t.held + t.paid < t.size and not seat_blocked(ctx, m, user, t.sku, t.qty)
end

-- Seat user in t for a quick-join; `first` when t is the first entry of its sku's range.
local function quick_seat(ctx, m, t, user, field, first)
  local reply, seq = take_seat(ctx, m, t, user)
  remember(ctx, field, 'q', seq)
  ctx.first[t.sku] = first and t or nil
  return reply
end

local function op_quick(ctx, key, rl, user, sku, scan)
  local k = ctx.k
  local field = user .. ':' .. key
  local prior = replay(ctx, field, 'q', sku)
  if prior then return prior end
  local wait = rate_limited(rl, ctx.rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = ctx_meta(ctx)
  if not m then return {NOT_FOUND} end
  if m.invalid > 0 then return {INVALIDATED} end
  if m.kind ~= 'team' then return {WRONG_KIND} end

  -- A team seated as the first entry of the sku's range is still first afterwards (one
  -- remaining seat fewer sorts earlier) while it has a free seat, unless another team of the
  -- sku took a seat since (take_seat forgets it then): no need to read the index again.
  local first = ctx.first[sku]
  if first and quick_fits(ctx, m, first, user) then
    return quick_seat(ctx, m, first, user, field, true)
  end
  flush_index(ctx)
  local offset, page = 0, 1
  while offset < scan do
    page = math.min(page, scan - offset)
    local entries = redis.call('ZRANGEBYLEX', k.joinable, '[' .. sku .. '|', '[' .. sku .. '|~',
      'LIMIT', offset, page)
    for i, entry in ipairs(entries) do
      local t = ctx_team(ctx, string.match(entry, '[^|]+$'))
      if t and quick_fits(ctx, m, t, user) then
        return quick_seat(ctx, m, t, user, field, offset == 0 and i == 1)
      end
    end
    if #entries < page then break end
    offset, page = offset + page, QUICK_PAGE
  end

  local closed = gate_reply(m, ctx.now, 'team')
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
local function op_probe(ctx, key, user, sku, qty_arg)
  local prior = replay(ctx, user .. ':' .. key, 'r',
    sku .. ':' .. string.format('%d', tonumber(qty_arg)))
  if prior then return prior end
  return {SOLD_OUT, 0}
end
