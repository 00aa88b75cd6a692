-- quick_join.lua (op_quick in lib/team_ops.lua): in one atomic step, seat the user in the open
-- team of this sku with the fewest remaining seats (then the earliest expiry) that the user
-- is not in and can afford (limit, stock for the team's units per seat); when none fits and
-- the campaign is active, open a new pending team led by the user (one unit per seat).
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/ops.lua lib/team_ops.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- KEYS[11..12] the rate-limit windows (lib/ops.lua; only when the rate limit is on)
-- ARGV[1] campaign id  ARGV[2] rate limit per second (0 = off)  ARGV[3] idempotency TTL (s)
-- ARGV[4] how many index entries to look at before opening a new team
-- ARGV[5] user id  ARGV[6] sku  ARGV[7] '' (one unit per seat)  ARGV[8] idempotency key
-- returns {0, order_id, record, replayed, team_id, team_record, opened 0|1}
--         {8} | {7, retry_after_ms}          key reused differently | too many attempts
--         {1} | {4} | {17}                   no campaign | invalidated | not a team campaign
--         {2, starts_ms} | {3, ends_ms}      no team to join and none may be opened
--         {1, sku} | {6, units_left} | {5, available}   unknown sku | limit | sold out
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = creation_ctx(1)
return run_ops(ctx, function()
  return op_quick(ctx, ARGV[5], ARGV[6], ARGV[8])
end)
