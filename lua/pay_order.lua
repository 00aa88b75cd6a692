-- pay_order.lua: record the payment of a held order by its owner.
--
-- KEYS[1] meta  KEYS[2] inv  KEYS[3] orders  KEYS[4] users  KEYS[5] deadlines  KEYS[6] events
-- ARGV[1] order id   ARGV[2] user id   ARGV[3] payment reference
-- returns {0, order_id, record}   paid now, or already paid with this same reference
--         {1}                     no such order
--         {9}                     the order belongs to another user
--         {10}                    the hold ran out (expired, or past its deadline)
--         {4}                     the campaign was invalidated
--         {11, state}             not held (cancelled, refunded, or paid with another reference)
local k = {meta = KEYS[1], inv = KEYS[2], orders = KEYS[3], users = KEYS[4], deadlines = KEYS[5],
  events = KEYS[6]}
local id, user, payref = ARGV[1], ARGV[2], ARGV[3]

local o = load_order(k.orders, id)
if not o then return {NOT_FOUND} end
if o.user ~= user then return {FORBIDDEN} end
if o.state == 'P' and o.payref == payref then return {OK, id, redis.call('HGET', k.orders, id)} end
if o.state == 'E' then return {HOLD_EXPIRED} end
if o.state ~= 'H' then return {INVALID_STATE, o.state} end
local now = now_ms()
if now >= o.deadline then return {HOLD_EXPIRED} end
if tonumber(redis.call('HGET', k.meta, 'invalid') or '0') > 0 then return {INVALIDATED} end

move(k.inv, o.sku, 'h', 'p', o.qty)
redis.call('ZREM', k.deadlines, id)
o.state = 'P'
o.payref = payref
return {OK, id, save_order(k.orders, k.events, o, now, 'user')}
