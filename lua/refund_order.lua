-- refund_order.lua: after-sale refund of a paid order (admin); stock returns only on restock.
-- A team order is refundable this way once its team succeeded; while the team is open its
-- paid seats stay (a failing team refunds them itself, expire_teams.lua).
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] order id   ARGV[2] restock (1 = units go back on sale, 0 = they leave the sale)
-- returns {0, order_id, record, 0[, team_id, team_record, opened]}
--                                 refunded now, or already refunded (a retry)
--         {1}                     no such order
--         {16}                    a paid seat of a team still in progress
--         {11, state}             not paid (held, cancelled or expired)
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = new_ctx(order_keys())
local id, restock = ARGV[1], ARGV[2] == '1'

local o = ctx_order(ctx, id)
if not o then return {NOT_FOUND} end
if o.state == 'R' then return order_reply(ctx, id) end
if o.state ~= 'P' then return {INVALID_STATE, o.state} end
if o.kind == 't' and ctx_team(ctx, o.team).state ~= 'S' then return {TEAM_IN_PROGRESS} end

return run_ops(ctx, function()
  move(ctx, o.sku, 'p', restock and 'a' or 'r', o.qty)
  add_units(ctx, o.user, -o.qty)
  o.state = 'R'
  emit_order(ctx, o, restock and 'restock' or 'no_restock')
  return order_reply(ctx, id)
end)
