-- batch.lua: request coalescing. Runs many reserve / join / quick-join requests of ONE
-- campaign in one atomic call, in arrival order, each exactly as its own script would
-- (lib/ops.lua and lib/team_ops.lua, sharing one context: clock, meta, prices, stock, order
-- ids), and returns one reply per request. One EVALSHA per batch; every key shares the
-- campaign's hash tag, so a batch runs on one Redis Cluster slot.
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua lib/ops.lua lib/team_ops.lua
--
-- KEYS[1..10]  the campaign's order keys (engine/keys.py order_keys)
-- KEYS[11..12] the rate-limit windows (lib/ops.lua; only when the rate limit is on)
-- ARGV[1] campaign id  ARGV[2] rate limit per second (0 = off)  ARGV[3] idempotency TTL (s)
-- ARGV[4] quick-join scan bound
-- ARGV[5] the n requests' fields joined by '|' (none of them can hold a '|'), 5 per request,
--   in the order of the one-call scripts' ARGV[5..8] after the op:
--   op ('r' reserve | 'p' sold-out probe | 'j' join | 'q' quick-join), user id,
--   sku ('r', 'p', 'q') or team id ('j'), qty ('r', 'p'; '' for 'j', 'q'), idempotency key
-- returns {reply_1, ..., reply_n}: each the reply reserve_stock.lua, join_team.lua or
--   quick_join.lua documents for that request ('p': op_probe's, in lib/ops.lua).
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local f = split(ARGV[5])
local n = #f / 5
local ctx = creation_ctx(n)
local replies = {}
return run_ops(ctx, function()
  for i = 1, n do
    local a = (i - 1) * 5
    local op, user, target, qty, key = f[a + 1], f[a + 2], f[a + 3], f[a + 4], f[a + 5]
    if op == 'r' then
      replies[i] = op_reserve(ctx, user, target, qty, key)
    elseif op == 'p' then
      replies[i] = op_probe(ctx, user, target, qty, key)
    elseif op == 'j' then
      replies[i] = op_join(ctx, user, target, key)
    else
      replies[i] = op_quick(ctx, user, target, key)
    end
  end
  return replies
end)
