-- lib/ops.lua: the order-creating operations: what they share (idempotency, rate limit, the
-- campaign gate, the one seat rule, new held orders) and the flash-sale ones, reserve and the
-- sold-out probe (reserve_stock.lua; lib/team_ops.lua has the team ones). batch.lua runs many
-- of them for one campaign in one EVALSHA (request coalescing). Each returns exactly the reply
-- its script documents. Requires lib/ctx.lua (and what it requires).
--
-- Every one of these scripts starts with the same ARGV: campaign id, rate limit (attempts
-- per user and second, 0 = off), idempotency TTL (s), quick-join scan bound. Then each request
-- is the same five fields in the same order everywhere (ARGV, batch.lua's packed string,
-- the op_* functions, engine/scripts.py): op, user id, sku or team id, qty, idempotency key.
-- Every op takes the call's context first, then the request's fields in that order.
--
-- The rate limit counts each user's attempts per second of the Redis clock in one of the
-- campaign's two window hashes (KEYS[11] for even seconds, KEYS[12] for odd ones; passed only
-- when the limit is on): field user id -> attempts, and ':s' -> the second the hash counts.
-- The first attempt of a second empties the hash left from two seconds before. So there is
-- no key per user: two small hashes per campaign, holding the users of the last two seconds.

-- The context of an order-creating script making at most n orders; `rl` the rate windows.
local function creation_ctx(n)
  local ctx = new_ctx(order_keys(), ARGV[1], n, tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4]))
  if ctx.rate > 0 then ctx.rl = {KEYS[11], KEYS[12]} end
  return ctx
end

-- A fixed one-second window of attempts per user (the Redis clock's seconds); returns the
-- window's remaining ms when over.
local function rate_limited(ctx, user)
  if ctx.rate <= 0 then return nil end
  local second = math.floor(ctx.now / 1000)
  local window = ctx.rl[second % 2 + 1]
  if ctx.rl_second ~= second then  -- once per call: this window counts this second
    local counted = redis.call('HGET', window, ':s')
    if counted ~= string.format('%d', second) then
      redis.call('UNLINK', window)
      redis.call('HSET', window, ':s', string.format('%d', second))
      redis.call('PEXPIRE', window, 2000)
    end
    ctx.rl_second = second
  end
  if redis.call('HINCRBY', window, user, 1) > ctx.rate then
    return 1000 - ctx.now % 1000
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

-- What every order-creating op checks first, in this order: an idempotent retry gets its
-- original reply (or the key mismatch); the attempt counts against the rate limit; then the
-- campaign gate. Returns the campaign's meta, and the reply to return at once (nil: go on).
local function admit(ctx, user, field, op, want, kind, opening)
  ctx.creating = op .. field  -- the order this request creates carries it (create_order)
  local prior = replay(ctx, field, op, want)
  if prior then return nil, prior end
  local wait = rate_limited(ctx, user)
  if wait then return nil, {RATE_LIMITED, wait} end
  local m = ctx_meta(ctx)
  return m, campaign_closed(m, ctx.now, kind, opening)
end

-- The one rule for a shopper taking qty more units of sku (a reservation, a new team, a
-- seat): nil when the per-order cap, the per-user limit and the stock allow it, else the
-- rejection.
local function seat_blocked(ctx, m, user, sku, qty)
  if m.order_limit > 0 and qty > m.order_limit then return {ORDER_LIMIT_EXCEEDED, m.order_limit} end
  local units = user_units(ctx, user)
  if units + qty > m.limit then return {LIMIT_EXCEEDED, m.limit - units} end
  local available = units_available(ctx, sku)
  if available < 0 then return {NOT_FOUND, sku} end
  if available < qty then return {SOLD_OUT, available} end
  return nil
end

-- A new held order of qty units of sku for user until `deadline` (of team_id, if given) at
-- `unit` per unit (default: the item's price); returns the order and its sequence number. Its
-- `idem` ("<op><user>:<key>", set by admit) goes into its order.reserved event, so SQL keeps
-- the idempotency record too.
local function create_order(ctx, user, sku, qty, deadline, team_id, unit)
  move(ctx, sku, 'a', 'h', qty)
  add_units(ctx, user, qty)
  local seq = next_seq(ctx)
  local id = ctx.cid .. '.o' .. seq
  schedule(ctx, deadline, id)
  return {id = id, user = user, sku = sku, qty = qty, amount = qty * (unit or unit_price(ctx, sku)),
    state = 'H', created = ctx.now, deadline = deadline, version = 0,
    kind = team_id and 't' or 'f', team = team_id or '', payref = '', idem = ctx.creating},
    seq
end

-- Reserve qty units of one item of a flash campaign (reserve_stock.lua).
local function op_reserve(ctx, user, sku, qty_arg, key)
  local qty = tonumber(qty_arg)
  local field = user .. ':' .. key
  local m, early = admit(ctx, user, field, 'r', sku .. ':' .. string.format('%d', qty), 'flash',
    true)
  if early then return early end
  if not unit_price(ctx, sku) then return {NOT_FOUND, sku} end
  local blocked = seat_blocked(ctx, m, user, sku, qty)
  if blocked then return blocked end

  local o, seq = create_order(ctx, user, sku, qty, ctx.now + m.hold, nil)
  remember(ctx, field, 'r', seq)
  return {OK, o.id, emit_order(ctx, o, 'user'), 0}
end

-- The sold-out fast path (engine/flash.py): the item was sold out a moment ago. Returns the
-- replay of an earlier attempt (or the key mismatch); else, while the item has no unit left,
-- {5, 0} sold out without touching stock, limits or the rate counter; once a unit is back (an
-- expiry, a cancel), the reservation itself: a process that still counts the item sold out
-- answers what any other would, so a retry sent to another node gets the same answer.
local function op_probe(ctx, user, sku, qty_arg, key)
  local prior = replay(ctx, user .. ':' .. key, 'r',
    sku .. ':' .. string.format('%d', tonumber(qty_arg)))
  if prior then return prior end
  if units_available(ctx, sku) > 0 then return op_reserve(ctx, user, sku, qty_arg, key) end
  return {SOLD_OUT, 0}
end
