-- expire_orders.lua: the reaper's step for one campaign: end held orders whose deadline passed.
-- Exactly once however many reapers run: the order leaves the deadline index in the same step.
-- Once the campaign is invalidated every held order is cancelled instead, due or not (SPEC 3).
--
-- A held team seat that ends is freed (the team is joinable again); a pending team whose
-- leader never paid is dissolved.
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] at most this many orders in one call (keeps each script call short)
-- returns {ended, next}   orders ended now; next = the earliest remaining deadline (ms),
--                         0 when more are due at once, -1 when none is held; -2 when none is
--                         held, no team is open and the campaign is over (ended or
--                         invalidated): nothing can ever be due again, the reaper may forget it
local k = order_keys()
local limit = tonumber(ARGV[1])
local now = now_ms()
local invalidated = tonumber(redis.call('HGET', k.meta, 'invalid') or '0') > 0
local upto = invalidated and '+inf' or now

local due = redis.call('ZRANGEBYSCORE', k.deadlines, '-inf', upto, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local o = load_order(k.orders, id)
  if o and o.state == 'H' then
    local reason = invalidated and 'invalidated' or 'deadline'
    release_hold(k, o, invalidated and 'C' or 'E', now, reason)
    if o.kind == 't' then seat_released(k, o, now, reason) end
  else
    redis.call('ZREM', k.deadlines, id)
  end
end

local head = redis.call('ZRANGE', k.deadlines, 0, 0, 'WITHSCORES')
if #head == 0 then
  local ends = tonumber(redis.call('HGET', k.meta, 'ends') or '0')
  local over = invalidated or now >= ends
  if over and redis.call('ZCARD', k.team_deadlines) == 0 then return {#due, -2} end
  return {#due, -1}
end
if invalidated or tonumber(head[2]) <= now then return {#due, 0} end
return {#due, head[2]}
