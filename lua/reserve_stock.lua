-- reserve_stock.lua: reserve qty units of one item of a flash campaign for one user.
--
-- KEYS[1..9] the campaign's order keys (engine/keys.py order_keys): meta, inv, orders, users,
--            deadlines, events, teams, joinable, team_deadlines
-- KEYS[10] idem  string  this (user, idempotency key)'s record: "<order id>|<fingerprint>"
-- KEYS[11] rl    string  this user's attempts in the current second
-- ARGV[1] campaign id     ARGV[2] user id      ARGV[3] sku      ARGV[4] qty (>= 1)
-- ARGV[5] rate limit (attempts per second, 0 = off)  ARGV[6] idempotency TTL (s)
-- returns {0, order_id, record, replayed 0|1}       reserved, or the original order on a retry
--         {8}                                       key reused with another sku or qty
--         {7, retry_after_ms}                       too many attempts this second
--         {1} | {4} | {17}                          no campaign | invalidated | not a flash campaign
--         {2, starts_ms} | {3, ends_ms}             not started | ended
--         {1, sku} | {6, units_left} | {5, available} unknown sku | over the limit | sold out
-- Checks run before the first write (the rate-limit counter aside, which counts attempts).
local k = order_keys()
local cid, user, sku, qty = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fingerprint = 'reserve:' .. sku .. ':' .. ARGV[4]

local prior = replay(k, KEYS[10], fingerprint)
if prior then return prior end
local wait = rate_limited(KEYS[11], tonumber(ARGV[5]))
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
local o = {id = id, user = user, sku = sku, qty = qty, amount = qty * tonumber(price), state = 'H',
  created = now, deadline = now + m.hold, version = 0, kind = 'f', team = '', payref = ''}
redis.call('ZADD', k.deadlines, o.deadline, id)
remember(KEYS[10], id, fingerprint, tonumber(ARGV[6]))
save_order(k.orders, k.events, o, now, 'user')
return order_reply(k, id, 0)
