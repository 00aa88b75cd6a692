-- cancel_order.lua: the owner cancels a held order; its stock is sellable again at once.
--
-- KEYS[1] meta  KEYS[2] inv  KEYS[3] orders  KEYS[4] users  KEYS[5] deadlines  KEYS[6] events
-- ARGV[1] order id   ARGV[2] user id
-- returns {0, order_id, record}   cancelled now, or already cancelled (a retry)
--         {1}                     no such order
--         {9}                     the order belongs to another user
--         {11, state}             not held (paid, expired or refunded)
local k = {meta = KEYS[1], inv = KEYS[2], orders = KEYS[3], users = KEYS[4], deadlines = KEYS[5],
  events = KEYS[6]}
local id, user = ARGV[1], ARGV[2]

local o = load_order(k.orders, id)
if not o then return {NOT_FOUND} end
if o.user ~= user then return {FORBIDDEN} end
if o.state == 'C' then return {OK, id, redis.call('HGET', k.orders, id)} end
if o.state ~= 'H' then return {INVALID_STATE, o.state} end
return {OK, id, release_hold(k, o, 'C', now_ms(), 'user')}
