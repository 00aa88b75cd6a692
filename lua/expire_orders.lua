-- expire_orders.lua: the reaper's step for one campaign: end held orders whose deadline passed.
-- Exactly once however many reapers run: the order leaves the deadline index in the same step.
-- Once the campaign is invalidated every held order is cancelled instead, due or not (SPEC 3).
--
-- KEYS[1] meta  KEYS[2] inv  KEYS[3] orders  KEYS[4] users  KEYS[5] deadlines  KEYS[6] events
-- ARGV[1] at most this many orders in one call (keeps each script call short)
-- returns {ended, next}   orders ended now; next = the earliest remaining deadline (ms),
--                         0 when more are due at once, -1 when none is held; -2 when none is
--                         held and the campaign is over (ended or invalidated): nothing can
--                         ever be due again, the reaper may forget it
local k = {meta = KEYS[1], inv = KEYS[2], orders = KEYS[3], users = KEYS[4], deadlines = KEYS[5],
  events = KEYS[6]}
local limit = tonumber(ARGV[1])
local now = now_ms()
local invalidated = tonumber(redis.call('HGET', k.meta, 'invalid') or '0') > 0
local upto = invalidated and '+inf' or now

local due = redis.call('ZRANGEBYSCORE', k.deadlines, '-inf', upto, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local o = load_order(k.orders, id)
  if o and o.state == 'H' then
    if invalidated then
      release_hold(k, o, 'C', now, 'invalidated')
    else
      release_hold(k, o, 'E', now, 'deadline')
    end
  else
    redis.call('ZREM', k.deadlines, id)
  end
end

local head = redis.call('ZRANGE', k.deadlines, 0, 0, 'WITHSCORES')
if #head == 0 then
  local ends = tonumber(redis.call('HGET', k.meta, 'ends') or '0')
  if invalidated or now >= ends then return {#due, -2} end
  return {#due, -1}
end
if invalidated or tonumber(head[2]) <= now then return {#due, 0} end
return {#due, head[2]}
