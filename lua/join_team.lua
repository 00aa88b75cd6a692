-- join_team.lua: a user takes a seat in an open team (op_join in lib/team_ops.lua). The seat
-- is held until payment, at most until the team's own expiry; a held seat counts as taken, so
-- a team never over-fills. Joining works after the campaign's end, until the team's expiry
-- (docs/lifecycle.md#campaign and #team).
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/ops.lua lib/team_ops.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- KEYS[11..12] the rate-limit windows (lib/ops.lua; only when the rate limit is on)
-- ARGV[1] campaign id  ARGV[2] rate limit per second (0 = off)  ARGV[3] idempotency TTL (s)
-- ARGV[4] quick-join scan bound (unused here)
-- ARGV[5] user id  ARGV[6] team id  ARGV[7] '' (the team's qty applies)  ARGV[8] idempotency key
-- returns {0, order_id, record, replayed, team_id, team_record, 0}   seated (or a retry)
--         {8} | {7, retry_after_ms}         key reused differently | too many attempts
--         {1} | {4} | {17}                  no campaign or team | invalidated | not a team campaign
--         {14, state|'expired'}             the team is not open (pending, succeeded, failed,
--                                           dissolved) or its time ran out
--         {15}                              the user already holds a seat (leaders included)
--         {13}                              every seat is held or paid
--         {6, units_left} | {5, available}  per-user limit | sold out
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = creation_ctx(1)
return run_ops(ctx, function()
  return op_join(ctx, ARGV[5], ARGV[6], ARGV[8])
end)
