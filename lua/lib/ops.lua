-- lib/ops.lua: the order-creating operations as functions, shared by their one-call scripts
-- (reserve_stock.lua, join_team.lua, quick_join.lua) and by batch.lua, which runs many of
-- them for one campaign in one EVALSHA (request coalescing). Each returns exactly the reply
-- its script documents. Requires lib/common.lua and lib/team.lua.
--
-- Every function takes the campaign's order keys k, this request's idempotency key `idem` and
-- rate-limit key `rl`, then its own arguments; `rate` attempts per second (0 = off) and `ttl`
-- the idempotency TTL in seconds.

-- Reserve qty units of one item of a flash campaign (reserve_stock.lua).
local function op_reserve(k, idem, rl, cid, user, sku, qty_arg, rate, ttl)
  local qty = tonumber(qty_arg)
  local fingerprint = 'reserve:' .. sku .. ':' .. qty_arg
  local prior = replay(k, idem, fingerprint)
  if prior then return prior end
  local wait = rate_limited(rl, rate)
  if wait then return {RATE_LIMITED, wait} end

  local now = now_ms()
  local m = load_meta(k.meta)
  local closed = gate_reply(m, now, 'flash')
  if closed then return closed end

  local price = redis.call('HGET', k.inv, '$:' .. sku)
  if not price then return {NOT_FOUND, sku} end
  local units = tonumber(redis.call('HGET', k.users, user) or '0')
  if units + qty > m.limit then return {LIMIT_EXCEEDED, m.limit - units} end
  local available = tonumber(redis.call('HGET', k.inv, 'a:' .. sku))
  if available < qty then return {SOLD_OUT, available} end

  move(k.inv, sku, 'a', 'h', qty)
  redis.call('HINCRBY', k.users, user, qty)
  local id = cid .. '.o' .. redis.call('HINCRBY', k.meta, 'oseq', 1)
  local o = {id = id, user = user, sku = sku, qty = qty, amount = qty * tonumber(price),
    state = 'H', created = now, deadline = now + m.hold, version = 0, kind = 'f', team = '',
    payref = ''}
  redis.call('ZADD', k.deadlines, o.deadline, id)
  remember(idem, id, fingerprint, ttl)
  save_order(k.orders, k.events, o, now, 'user')
  return order_reply(k, id, 0)
end

-- Take a seat in an open team (join_team.lua).
local function op_join(k, idem, rl, cid, user, team_id, rate, ttl)
  local fingerprint = 'join:' .. team_id
  local prior = replay(k, idem, fingerprint)
  if prior then return prior end
  local wait = rate_limited(rl, rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = load_meta(k.meta)
  if not m then return {NOT_FOUND} end
  if m.invalid > 0 then return {INVALIDATED} end
  if m.kind ~= 'team' then return {WRONG_KIND} end
  local t = load_team(k.teams, team_id)
  if not t then return {NOT_FOUND} end
  local now = now_ms()
  local blocked = join_blocked(k, m, t, user, now)
  if blocked then return blocked end

  local id = take_seat(k, m, t, user, now, cid)
  remember(idem, id, fingerprint, ttl)
  return order_reply(k, id, 0)
end

-- Seat the user in the best open team of the sku they can afford, else open a new one-unit
-- team (quick_join.lua); `scan` bounds the index entries looked at.
local function op_quick(k, idem, rl, cid, user, sku, rate, ttl, scan)
  local fingerprint = 'quick:' .. sku
  local prior = replay(k, idem, fingerprint)
  if prior then return prior end
  local wait = rate_limited(rl, rate)
  if wait then return {RATE_LIMITED, wait} end

  local m = load_meta(k.meta)
  if not m then return {NOT_FOUND} end
  if m.invalid > 0 then return {INVALIDATED} end
  if m.kind ~= 'team' then return {WRONG_KIND} end
  local now = now_ms()

  local entries = redis.call('ZRANGEBYLEX', k.joinable, '[' .. sku .. '|', '[' .. sku .. '|~',
    'LIMIT', 0, scan)
  for _, entry in ipairs(entries) do
    local t = load_team(k.teams, string.match(entry, '[^|]+$'))
    if t and t.state == 'O' and now < t.expires and not member_index(t, user)
        and t.held + t.paid < t.size and not seat_blocked(k, m, user, sku, t.qty) then
      local id = take_seat(k, m, t, user, now, cid)
      remember(idem, id, fingerprint, ttl)
      return order_reply(k, id, 0)
    end
  end

  local closed = gate_reply(m, now, 'team')
  if closed then return closed end
  local blocked = seat_blocked(k, m, user, sku, 1)
  if blocked then return blocked end
  local id = open_pending_team(k, m, user, sku, 1, now, cid)
  remember(idem, id, fingerprint, ttl)
  return order_reply(k, id, 0)
end

-- The sold-out fast path (engine/flash.py): the item was sold out a moment ago, so only an
-- idempotent replay can still succeed. Returns the replay (or the key mismatch), else
-- {5, 0} sold out, without touching stock, limits or the rate counter.
local function op_probe(k, idem, sku, qty_arg)
  local prior = replay(k, idem, 'reserve:' .. sku .. ':' .. qty_arg)
  if prior then return prior end
  return {SOLD_OUT, 0}
end
