-- quick_join.lua (op_quick in lib/ops.lua): in one atomic step, seat the user in the open
-- team of this sku with the fewest remaining seats (then the earliest expiry) that the user
-- is not in and can afford (limit, stock for the team's units per seat); when none fits and
-- the campaign is active, open a new pending team led by the user (one unit per seat).
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- KEYS[11] rl    string  this user's attempts in the current second
-- ARGV[1] campaign id  ARGV[2] user id  ARGV[3] sku
-- ARGV[4] rate limit per second (0 = off)  ARGV[5] idempotency TTL (s)
-- ARGV[6] how many index entries to look at before opening a new team
-- ARGV[7] idempotency key
-- returns {0, order_id, record, replayed, team_id, team_record, opened 0|1}
--         {8} | {7, retry_after_ms}          key reused differently | too many attempts
--         {1} | {4} | {17}                   no campaign | invalidated | not a team campaign
--         {2, starts_ms} | {3, ends_ms}      no team to join and none may be opened
--         {1, sku} | {6, units_left} | {5, available}   unknown sku | limit | sold out
local ctx = new_ctx(order_keys(), ARGV[1], 1, tonumber(ARGV[4]), tonumber(ARGV[5]))
return run_ops(ctx, function()
  return op_quick(ctx, ARGV[7], KEYS[11], ARGV[2], ARGV[3], tonumber(ARGV[6]))
end)
