-- common.lua: helpers prepended to every script by engine/scripts.py (EVAL has no modules).
-- Defines locals only; touches no key except through the arguments it is given.
--
-- Order record, one field of the campaign's `orders` hash (order id -> record):
--   user|sku|qty|amount|state|created_ms|deadline_ms|version|kind|team|payment_ref
--   state: H held, P paid, C cancelled, E expired, R refunded; kind: f flash, t team;
--   version: 1 at creation, +1 on every state change (the durable store keeps the highest).
--
-- Return codes shared by every script (engine/scripts.py Code mirrors them):
--   0 ok, 1 not_found, 2 not_started, 3 ended, 4 invalidated, 5 sold_out, 6 limit_exceeded,
--   7 rate_limited, 8 idempotency_mismatch, 9 forbidden, 10 hold_expired, 11 invalid_state,
--   12 not_editable, 13 team_full, 14 team_closed, 15 already_in_team, 16 team_in_progress,
--   17 wrong_kind

local OK, NOT_FOUND, NOT_STARTED, ENDED, INVALIDATED = 0, 1, 2, 3, 4
local SOLD_OUT, LIMIT_EXCEEDED, RATE_LIMITED, IDEMPOTENCY_MISMATCH = 5, 6, 7, 8
local FORBIDDEN, HOLD_EXPIRED, INVALID_STATE, NOT_EDITABLE = 9, 10, 11, 12
local TEAM_FULL, TEAM_CLOSED, ALREADY_IN_TEAM, TEAM_IN_PROGRESS, WRONG_KIND = 13, 14, 15, 16, 17

-- KEYS[1..10] of every order and team script, in this order (engine/keys.py order_keys).
local function order_keys()
  return {meta = KEYS[1], inv = KEYS[2], orders = KEYS[3], users = KEYS[4], deadlines = KEYS[5],
    events = KEYS[6], teams = KEYS[7], joinable = KEYS[8], team_deadlines = KEYS[9],
    idem = KEYS[10]}
end

-- One clock for every host: the Redis server's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(s)
  local out, i = {}, 1
  while true do
    local j = string.find(s, '|', i, true)
    if not j then
      out[#out + 1] = string.sub(s, i)
      return out
    end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

local function encode_order(o)
  return table.concat({o.user, o.sku, string.format('%d', o.qty), string.format('%d', o.amount),
    o.state, string.format('%d', o.created),
    string.format('%d', o.deadline), o.version, o.kind, o.team, o.payref}, '|')
end

local function load_order(orders_key, id)
  local raw = redis.call('HGET', orders_key, id)
  if not raw then return nil end
  local f = split(raw)
  return {id = id, user = f[1], sku = f[2], qty = tonumber(f[3]), amount = tonumber(f[4]),
    state = f[5], created = tonumber(f[6]), deadline = tonumber(f[7]), version = tonumber(f[8]),
    kind = f[9], team = f[10], payref = f[11]}
end

-- Store the order with its new state and append the matching event to the outbox stream.
local STATE_EVENT = {H = 'order.reserved', P = 'order.paid', C = 'order.cancelled',
  E = 'order.expired', R = 'order.refunded'}

local function save_order(orders_key, events_key, o, at, reason)
  o.version = o.version + 1
  local raw = encode_order(o)
  redis.call('HSET', orders_key, o.id, raw)
  redis.call('XADD', events_key, '*', 'type', STATE_EVENT[o.state], 'order', o.id,
    'record', raw, 'at', string.format('%d', at), 'reason', reason)
  return raw
end

-- Move qty units of sku between inventory buckets: a available, h held, p paid,
-- r refunded without restock (gone from the sale). The first time an item's available units
-- reach 0, 'out:<sku>' records when (ms): the KPI "time to sell out".
local function move(inv_key, sku, from, to, qty)
  local left = redis.call('HINCRBY', inv_key, from .. ':' .. sku, -qty)
  redis.call('HINCRBY', inv_key, to .. ':' .. sku, qty)
  if from == 'a' and left == 0 then
    redis.call('HSETNX', inv_key, 'out:' .. sku, string.format('%d', now_ms()))
  end
end

-- End a held order (cancelled C or expired E): stock back, user's units freed, index cleaned.
local function release_hold(k, o, state, at, reason)
  move(k.inv, o.sku, 'h', 'a', o.qty)
  redis.call('HINCRBY', k.users, o.user, -o.qty)
  redis.call('ZREM', k.deadlines, o.id)
  o.state = state
  return save_order(k.orders, k.events, o, at, reason)
end

-- Campaign gate for new orders: returns 0 or a code, plus the meta fields.
local META_FIELDS = {'kind', 'starts', 'ends', 'limit', 'hold', 'invalid', 'team_size', 'team_ttl'}

local function load_meta(meta_key)
  local v = redis.call('HMGET', meta_key, unpack(META_FIELDS))
  if not v[1] then return nil end
  return {kind = v[1], starts = tonumber(v[2]), ends = tonumber(v[3]), limit = tonumber(v[4]),
    hold = tonumber(v[5]), invalid = tonumber(v[6]), team_size = tonumber(v[7]),
    team_ttl = tonumber(v[8])}
end

local function gate(m, now)
  if not m then return NOT_FOUND end
  if m.invalid > 0 then return INVALIDATED end
  if now < m.starts then return NOT_STARTED end
  if now >= m.ends then return ENDED end
  return OK
end

-- nil while the campaign takes new orders of `kind`, else the rejection reply.
local function gate_reply(m, now, kind)
  local code = gate(m, now)
  if code == NOT_STARTED then return {code, string.format('%d', m.starts)} end
  if code == ENDED then return {code, string.format('%d', m.ends)} end
  if code ~= OK then return {code} end
  if m.kind ~= kind then return {WRONG_KIND} end
  return nil
end

-- Reply of an order-creating script: {0, order id, record, replayed, team id, team record, opened}
-- (the team fields only for team orders; opened = 1 when this order's user leads the team).
-- `raw` is the order's record, `team_record(team_id)` gives a team's.
local function seat_reply(id, raw, replayed, team_record)
  local team = split(raw)[10]
  if team == '' then return {OK, id, raw, replayed} end
  local team_raw = team_record(team)
  local leader_order = string.match(split(team_raw)[13], '^[^=]*')
  return {OK, id, raw, replayed, team, team_raw, leader_order == id and 1 or 0}
end

-- seat_reply of the order as stored.
local function order_reply(k, id, replayed)
  return seat_reply(id, redis.call('HGET', k.orders, id), replayed,
    function(team) return redis.call('HGET', k.teams, team) end)
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
