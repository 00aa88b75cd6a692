-- batch.lua: request coalescing. Runs many reserve / join / quick-join requests of ONE
-- campaign in one atomic call, in arrival order, each exactly as its own script would
-- (lib/ops.lua, sharing one context: clock, meta, prices, stock, order ids), and returns one
-- reply per request. One EVALSHA per batch; every key shares the campaign's hash tag, so a
-- batch runs on one Redis Cluster slot.
--
-- KEYS[1..10]  the campaign's order keys (engine/keys.py order_keys)
-- KEYS[10 + i] request i's rate-limit key (i = 1..n; only when the rate limit is on)
-- ARGV[1] campaign id  ARGV[2] n  ARGV[3] rate limit per second (0 = off)
-- ARGV[4] idempotency TTL (s)  ARGV[5] quick-join scan bound
-- ARGV[6] the requests' fields joined by '|' (none of them can hold a '|'), 5 per request:
--   op ('r' reserve | 'p' sold-out probe | 'j' join | 'q' quick-join), user id, idempotency
--   key, and  'r', 'p': sku, qty     'j': team id, ''     'q': sku, ''
-- returns {reply_1, ..., reply_n}: each the reply reserve_stock.lua, join_team.lua or
--   quick_join.lua documents for that request ('p': op_probe's, in lib/ops.lua).
local n, scan = tonumber(ARGV[2]), tonumber(ARGV[5])
local ctx = new_ctx(order_keys(), ARGV[1], n, tonumber(ARGV[3]), tonumber(ARGV[4]))
local f = split(ARGV[6])
local replies = {}
local function run_all()
  for i = 1, n do
    local a = (i - 1) * 5
    local op, user, key, x, y = f[a + 1], f[a + 2], f[a + 3], f[a + 4], f[a + 5]
    local rl = KEYS[10 + i]
    if op == 'r' then
      replies[i] = op_reserve(ctx, key, rl, user, x, y)
    elseif op == 'p' then
      replies[i] = op_probe(ctx, key, user, x, y)
    elseif op == 'j' then
      replies[i] = op_join(ctx, key, rl, user, x)
    else
      replies[i] = op_quick(ctx, key, rl, user, x, scan)
    end
  end
  return replies
end
return run_ops(ctx, run_all)
