-- open_team.lua (op_open in lib/team_ops.lua): a leader opens a team: their units are held
-- like a flash order and the team is pending until the leader pays (pay_order.lua then opens
-- it and starts its clock).
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/ops.lua lib/team_ops.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- KEYS[11..12] the rate-limit windows (lib/ops.lua; only when the rate limit is on)
-- ARGV[1] campaign id  ARGV[2] rate limit per second (0 = off)  ARGV[3] idempotency TTL (s)
-- ARGV[4] quick-join scan bound (unused here)
-- ARGV[5] leader user id  ARGV[6] sku  ARGV[7] qty per seat (>= 1)  ARGV[8] idempotency key
-- returns {0, order_id, record, replayed, team_id, team_record, 1}   opened (or a retry)
--         {8} | {7, retry_after_ms}             key reused differently | too many attempts
--         {1} | {4} | {17}                      no campaign | invalidated | not a team campaign
--         {2, starts_ms} | {3, ends_ms}         not started | ended (no new teams after the end)
--         {1, sku} | {6, units_left} | {5, available}   unknown sku | limit | sold out
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = creation_ctx(1)
return run_ops(ctx, function()
  return op_open(ctx, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
end)
