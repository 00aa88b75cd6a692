-- refund_order.lua: after-sale refund of a paid order (admin); stock returns only on restock.
--
-- KEYS[1] meta  KEYS[2] inv  KEYS[3] orders  KEYS[4] users  KEYS[5] deadlines  KEYS[6] events
-- ARGV[1] order id   ARGV[2] restock (1 = units go back on sale, 0 = they leave the sale)
-- returns {0, order_id, record}   refunded now, or already refunded (a retry)
--         {1}                     no such order
--         {11, state}             not paid (held, cancelled or expired)
local k = {meta = KEYS[1], inv = KEYS[2], orders = KEYS[3], users = KEYS[4], deadlines = KEYS[5],
  events = KEYS[6]}
local id, restock = ARGV[1], ARGV[2] == '1'

local o = load_order(k.orders, id)
if not o then return {NOT_FOUND} end
if o.state == 'R' then return {OK, id, redis.call('HGET', k.orders, id)} end
if o.state ~= 'P' then return {INVALID_STATE, o.state} end

move(k.inv, o.sku, 'p', restock and 'a' or 'r', o.qty)
redis.call('HINCRBY', k.users, o.user, -o.qty)
o.state = 'R'
return {OK, id, save_order(k.orders, k.events, o, now_ms(), restock and 'restock' or 'no_restock')}
