-- cancel_order.lua: the owner cancels a held order; its stock is sellable again at once. A held
-- team seat is freed (the team is joinable again); a pending team's leader dissolves the team.
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/release.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] order id   ARGV[2] user id
-- returns {0, order_id, record, 0[, team_id, team_record, opened]}
--                                 cancelled now, already cancelled (a retry), or its hold
--                                 already ended by expiry (the order as it is: expired)
--         {1}                     no such order
--         {9}                     the order belongs to another user
--         {16}                    a paid seat of a team still in progress (refunded only if
--                                 the team fails)
--         {11, state}             not held (paid or refunded)
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = new_ctx(order_keys())
local id, user = ARGV[1], ARGV[2]

local o = ctx_order(ctx, id)
if not o then return {NOT_FOUND} end
if o.user ~= user then return {FORBIDDEN} end
if o.state == 'C' or o.state == 'E' then return order_reply(ctx, id) end
if o.state == 'P' and o.kind == 't' then
  local state = ctx_team(ctx, o.team).state
  if state == 'O' or state == 'W' then return {TEAM_IN_PROGRESS} end
end
if o.state ~= 'H' then return {INVALID_STATE, o.state} end

return run_ops(ctx, function()
  release_hold(ctx, o, 'C', 'user')
  if o.kind == 't' then seat_released(ctx, o, 'user') end
  return order_reply(ctx, id)
end)
