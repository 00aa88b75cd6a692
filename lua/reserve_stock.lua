-- reserve_stock.lua: reserve qty units of one item of a flash campaign for one user
-- (op_reserve in lib/ops.lua; batch.lua runs many of these in one call).
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/ops.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys): meta, inv, orders, users,
--            deadlines, events, teams, joinable, team_deadlines, idem
-- KEYS[11..12] the rate-limit windows (lib/ops.lua; only when the rate limit is on)
-- ARGV[1] campaign id  ARGV[2] rate limit (attempts per second, 0 = off)
-- ARGV[3] idempotency TTL (s)  ARGV[4] quick-join scan bound (unused here)
-- ARGV[5] user id  ARGV[6] sku  ARGV[7] qty (>= 1)
-- ARGV[8] idempotency key (its record: field "<user>:<key>" of the idem hash, lib/ops.lua)
-- returns {0, order_id, record, replayed 0|1}       reserved, or the original order on a retry
--         {8}                                       key reused with another sku or qty
--         {7, retry_after_ms}                       too many attempts this second
--         {1} | {4} | {17}                          no campaign | invalidated | a team campaign
--         {2, starts_ms} | {3, ends_ms}             not started | ended
--         {1, sku} | {6, units_left} | {5, available} unknown sku | over the limit | sold out
-- Checks run before the first write (the rate-limit counter aside, which counts attempts).
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = creation_ctx(1)
return run_ops(ctx, function()
  return op_reserve(ctx, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
end)
