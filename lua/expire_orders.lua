-- expire_orders.lua: the reaper's step for one campaign: end held orders whose deadline passed.
-- Exactly once however many reapers run: the order leaves the deadline index in the same step.
-- Once the campaign is invalidated every held order is cancelled instead, due or not
-- (docs/lifecycle.md#campaign).
--
-- A held team seat that ends is freed (the team is joinable again); a pending team whose
-- leader never paid is dissolved.
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/release.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] at most this many orders in one call (keeps each script call short)
-- returns {ended, next}   orders ended now; next = the earliest remaining deadline (ms),
--                         0 when more are due at once, -1 when none is held; -2 when none is
--                         held, no team is open and the campaign is over (ended or
--                         invalidated): nothing can ever be due again, the reaper may forget it
--         {-1, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return {-1, refused[2]} end
local ctx = new_ctx(order_keys())
local k, now = ctx.k, ctx.now
local invalidated = tonumber(redis.call('HGET', k.meta, 'invalid') or '0') > 0
local upto = invalidated and '+inf' or now
local due = redis.call('ZRANGEBYSCORE', k.deadlines, '-inf', upto, 'LIMIT', 0, tonumber(ARGV[1]))

-- What the reaper does next: {ended, next} as documented above.
local function next_step()
  local head = redis.call('ZRANGE', k.deadlines, 0, 0, 'WITHSCORES')
  if #head == 0 then
    local ends = tonumber(redis.call('HGET', k.meta, 'ends') or '0')
    local over = invalidated or now >= ends
    if over and redis.call('ZCARD', k.team_deadlines) == 0 then return {#due, -2} end
    return {#due, -1}
  end
  if invalidated or tonumber(head[2]) <= now then return {#due, 0} end
  return {#due, head[2]}
end

return run_ops(ctx, function()
  local reason = invalidated and 'invalidated' or 'deadline'
  for _, id in ipairs(due) do
    local o = ctx_order(ctx, id)
    if o and o.state == 'H' then
      release_hold(ctx, o, invalidated and 'C' or 'E', reason)
      if o.kind == 't' then seat_released(ctx, o, reason) end
    else
      unschedule(ctx, id)
    end
  end
  return next_step()
end)
