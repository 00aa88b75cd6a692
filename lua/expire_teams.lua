-- expire_teams.lua: the reaper's step for teams: an open team whose expiry passed without
-- success fails: every paid seat is refunded and every held seat expired, all stock returned.
-- With the campaign's automatic success on (meta `auto` > 0), one with at least `auto` paid
-- seats succeeds instead: its paid seats stand, its held seats are released (lib/release.lua
-- auto_succeed). Exactly once: the team leaves `team_deadlines` in the same step. Once the
-- campaign is invalidated every open team fails at once (held seats are then cancelled,
-- docs/lifecycle.md#campaign), whatever its paid seats.
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/release.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] at most this many teams in one call
-- returns {ended, next}   teams ended now (failed, or succeeded automatically); next = the
--                         earliest remaining team expiry (ms), 0 when more are due at once,
--                         -1 when no team is open
--         {-1, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return {-1, refused[2]} end
local ctx = new_ctx(order_keys())
local k, now = ctx.k, ctx.now
local m = ctx_meta(ctx)
local invalidated = m.invalid > 0
local upto = invalidated and '+inf' or now
local due = redis.call('ZRANGEBYSCORE', k.team_deadlines, '-inf', upto, 'LIMIT', 0,
  tonumber(ARGV[1]))

-- with automatic success on, the paid seats an expired team needs to succeed (never on
-- invalidation)
local auto = (not invalidated and m.auto > 0) and m.auto or nil

return run_ops(ctx, function()
  for _, id in ipairs(due) do
    local t = ctx_team(ctx, id)
    if not (t and t.state == 'O') then
      redis.call('ZREM', k.team_deadlines, id)
    elseif auto and t.paid >= auto then
      auto_succeed(ctx, t)
    else
      fail_team(ctx, t, invalidated and 'invalidated' or 'expired')
    end
  end
  local head = redis.call('ZRANGE', k.team_deadlines, 0, 0, 'WITHSCORES')
  if #head == 0 then return {#due, -1} end
  if invalidated or tonumber(head[2]) <= now then return {#due, 0} end
  return {#due, head[2]}
end)
