-- batch.lua: request coalescing. Runs many reserve / join / quick-join requests of ONE
-- campaign in one atomic call, in arrival order, each exactly as its own script would
-- (lib/ops.lua), and returns one reply per request. One EVALSHA per batch; every key shares the
-- campaign's hash tag, so a batch runs on one Redis Cluster slot.
--
-- KEYS[1..9]  the campaign's order keys (engine/keys.py order_keys)
-- KEYS[8 + 2i], KEYS[9 + 2i]  request i's idempotency key and rate-limit key (i = 1..n)
-- ARGV[1] campaign id  ARGV[2] n  ARGV[3] rate limit per second  ARGV[4] idempotency TTL (s)
-- ARGV[5] quick-join scan bound
-- then per request 4 fields: op ('r' reserve | 'p' sold-out probe | 'j' join | 'q' quick-join),
--   user id, and  'r', 'p': sku, qty     'j': team id, ''     'q': sku, ''
-- returns {reply_1, ..., reply_n}: each the reply reserve_stock.lua, join_team.lua or
--   quick_join.lua documents for that request ('p': op_probe's, in lib/ops.lua).
local k = order_keys()
local cid, n = ARGV[1], tonumber(ARGV[2])
local rate, ttl, scan = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local replies = {}
for i = 1, n do
  local a = 6 + (i - 1) * 4
  local op, user, x, y = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local idem, rl = KEYS[8 + 2 * i], KEYS[9 + 2 * i]
  if op == 'r' then
    replies[i] = op_reserve(k, idem, rl, cid, user, x, y, rate, ttl)
  elseif op == 'p' then
    replies[i] = op_probe(k, idem, x, y)
  elseif op == 'j' then
    replies[i] = op_join(k, idem, rl, cid, user, x, rate, ttl)
  else
    replies[i] = op_quick(k, idem, rl, cid, user, x, rate, ttl, scan)
  end
end
return replies
