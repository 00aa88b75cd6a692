-- lib/ctx.lua: the one write path of every script that changes orders or teams. Requires
-- lib/common.lua, lib/order.lua and lib/team.lua.
--
-- A script builds one context (new_ctx), makes every check before its first write (Lua has
-- no rollback), then makes its changes inside run_ops. The context reads the Redis clock once,
-- and the campaign's meta, item prices, available units, users' units, orders and teams once
-- each, then keeps them as the changes go. The writes nobody reads back during the call wait
-- for finish, which makes each once per key: the inventory buckets (one HINCRBY per bucket
-- and item), users' units, order, team and idempotency records, new payment deadlines and the
-- joinable index. The outbox events are appended at once, in the order of the changes.
-- Removals from the deadline indexes are made at once too: the reaper's scripts read what is
-- left in the same call. Sound because a script runs atomically: nothing else touches these
-- keys meanwhile.

-- `cid`, `n`, `rate`, `ttl`, `scan`: only for the order-creating ops (lib/ops.lua).
local function new_ctx(k, cid, n, rate, ttl, scan)
  local now = now_ms()
  return {k = k, cid = cid, n = n or 1, rate = rate, ttl = ttl, scan = scan, now = now,
    at = string.format('%d', now), meta = nil, prices = {}, leader_prices = {}, avail = {},
    units = {},
    dirty_users = {}, buckets = {a = {}, h = {}, p = {}, r = {}}, teams = {}, team_raws = {},
    orders = {}, idem = {}, deadlines = {}, index = {}, first = {}, seq = 0, seq_last = 0}
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

-- The unit price a team's leader pays for sku: its leader price when the item has one
-- ('l:<sku>', at most the price), else its price.
local function leader_unit_price(ctx, sku)
  return hget_once(ctx.leader_prices, sku, ctx.k.inv, 'l:' .. sku, false) or unit_price(ctx, sku)
end

-- Available units of sku (with this call's moves), -1 for an unknown sku.
local function units_available(ctx, sku)
  local v = ctx.avail[sku]
  if v == nil then
    v = tonumber(redis.call('HGET', ctx.k.inv, 'a:' .. sku))
    v = v and v + (ctx.buckets.a[sku] or 0) or -1
    ctx.avail[sku] = v
  end
  return v
end

-- The user's held + paid units in the campaign (the per-user limit).
local function user_units(ctx, user)
  return hget_once(ctx.units, user, ctx.k.users, user, 0)
end

local function add_units(ctx, user, delta)
  ctx.units[user] = user_units(ctx, user) + delta
  ctx.dirty_users[user] = true
end

-- Move qty units of sku between inventory buckets: a available, h held, p paid, r refunded
-- without restock (gone from the sale).
local function move(ctx, sku, from, to, qty)
  local b = ctx.buckets
  b[from][sku] = (b[from][sku] or 0) - qty
  b[to][sku] = (b[to][sku] or 0) + qty
  local avail = ctx.avail[sku]
  if avail then
    if from == 'a' then avail = avail - qty end
    if to == 'a' then avail = avail + qty end
    ctx.avail[sku] = avail
  end
end

-- The order as this call left it so far, nil when there is none.
local function ctx_order(ctx, id)
  local raw = ctx.orders[id] or redis.call('HGET', ctx.k.orders, id)
  if not raw then return nil end
  return decode_order(id, raw)
end

-- The team (one table per team and call, changed in place), nil when there is none.
local function ctx_team(ctx, id)
  local t = ctx.teams[id]
  if t == nil then
    local raw = redis.call('HGET', ctx.k.teams, id)
    t = raw and decode_team(id, raw) or false
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
-- A new order's first event also carries its idempotency record (`idem`, lib/ops.lua).
local function emit_order(ctx, o, reason)
  o.version = o.version + 1
  local raw = encode_order(o)
  if o.version == 1 and o.idem then
    redis.call('XADD', ctx.k.events, '*', 'type', STATE_EVENT[o.state], 'order', o.id,
      'record', raw, 'at', ctx.at, 'reason', reason, 'idem', o.idem)
  else
    redis.call('XADD', ctx.k.events, '*', 'type', STATE_EVENT[o.state], 'order', o.id,
      'record', raw, 'at', ctx.at, 'reason', reason)
  end
  ctx.orders[o.id] = raw
  return raw
end

-- A new state of team t (its version up): the outbox event now (`etype` defaults to the
-- state's own event; `order_id` the order that caused it, if any), the record at finish.
local function emit_team(ctx, t, reason, etype, order_id)
  t.version = t.version + 1
  local raw = encode_team(t)
  redis.call('XADD', ctx.k.events, '*', 'type', etype or TEAM_EVENT[t.state], 'team', t.id,
    'record', raw, 'order', order_id or '', 'at', ctx.at, 'reason', reason)
  ctx.team_raws[t.id] = raw
  return raw
end

-- A held order's payment deadline, indexed for the reaper at finish.
local function schedule(ctx, deadline, id)
  local d = ctx.deadlines
  d[#d + 1], d[#d + 2] = deadline, id
end

local function unschedule(ctx, id)
  redis.call('ZREM', ctx.k.deadlines, id)
end

-- Team t is about to change seats, state or expiry: remember its joinable entry as it was.
local function touch_index(ctx, t)
  if ctx.index[t] == nil then ctx.index[t] = index_entry(t) end
end

-- Bring the joinable index up to date with the teams touched since the last flush.
local function flush_index(ctx)
  for t, old in pairs(ctx.index) do
    local new = index_entry(t)
    if old ~= new then
      if old then redis.call('ZREM', ctx.k.joinable, old) end
      if new then redis.call('ZADD', ctx.k.joinable, 0, new) end
    end
  end
  ctx.index = {}
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

local BUCKETS = {'a', 'h', 'p', 'r'}

-- The inventory moves of the call, one HINCRBY per bucket and item. The first time an item's
-- available units reach 0, 'out:<sku>' records when (ms): the KPI "time to sell out".
local function flush_buckets(ctx)
  local inv = ctx.k.inv
  for _, bucket in ipairs(BUCKETS) do
    for sku, delta in pairs(ctx.buckets[bucket]) do
      if delta ~= 0 then
        local left = redis.call('HINCRBY', inv, bucket .. ':' .. sku, delta)
        if bucket == 'a' and delta < 0 and left == 0 then
          redis.call('HSETNX', inv, 'out:' .. sku, ctx.at)
        end
      end
    end
  end
end

-- After the last change of a call: the deferred writes, the unused order ids back.
local function finish(ctx)
  local k = ctx.k
  flush_index(ctx)
  flush_buckets(ctx)
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

-- Run `changes` (a function returning the script's reply), then finish(ctx) even when it
-- raised an error (re-raised after): the writes made before it are never lost.
local function run_ops(ctx, changes)
  local ok, result = pcall(changes)
  finish(ctx)
  if not ok then error(result, 0) end
  return result
end

-- Reply of a script that returns an order: {0, order id, record, replayed, team id, team
-- record, opened} (the team fields only for team orders; opened = 1 when this order's user
-- leads the team). `raw` is the order's record; its team's is read as this call left it.
local function seat_reply(ctx, id, raw, replayed)
  local team = split(raw)[10]
  if team == '' then return {OK, id, raw, replayed} end
  local team_raw = ctx.team_raws[team] or redis.call('HGET', ctx.k.teams, team)
  local leader_order = string.match(split(team_raw)[13], '^[^=]*')
  return {OK, id, raw, replayed, team, team_raw, leader_order == id and 1 or 0}
end

-- seat_reply of the order as this call left it.
local function order_reply(ctx, id)
  return seat_reply(ctx, id, ctx.orders[id] or redis.call('HGET', ctx.k.orders, id), 0)
end
