-- warm_campaign.lua: load a campaign definition and its stock into Redis (warm-up), or edit it.
-- Guards the lifecycle on the Redis clock, so an edit racing the start can never reset the
-- stock of a campaign that has begun selling.
-- uses: lib/common.lua
--
-- KEYS[1] meta   hash   definition and flags
-- KEYS[2] inv    hash   inventory buckets (a:/h:/p:/r: units, i: initial stock, $: price per sku,
--                       l: a team leader's price per sku, when the item has one)
-- ARGV[1] mode   'define'  replace definition and stock; only while not started (by Redis time)
--                'ensure'  like define, but only when the campaign is absent and has not
--                          started (start-up warm-up): an absent campaign that has started
--                          lost its state with Redis and is never warmed with its initial
--                          stock again (engine/recovery.py rebuilds it from SQL)
--                'extend'  move ends to ARGV[2] (ms); only while running and never earlier
-- A loaded definition records this server's replication id (`node`, lib/common.lua): the state
-- it describes is the whole truth until the server restarts or is promoted.
-- ARGV[2..12] (define, ensure) kind, starts_ms, ends_ms, per_user_limit, hold_ms, team_size,
--            team_ttl_ms, invalidated_at_ms (0 = not invalidated), per_order_limit (0 = no
--            cap), auto_success_min_paid (0 = off), the time to pay (ms) a team must leave to
--            be offered by quick-join and the joinable list (Campaign.quick_join_min_ms)
-- ARGV[13..] (define, ensure) sku, price, stock, leader price ('' = none) quadruples
-- returns {0, loaded 0|1}   done (loaded = 1 when the definition was written)
--         {12, reason}      not editable: 'started', 'ended', 'invalidated' or 'earlier'
--         {18, why}         the campaign awaits a repair (lib/common.lua untrusted)
local mode = ARGV[1]
local now = now_ms()
local m = load_meta(KEYS[1])

if mode == 'extend' then
  local refused = untrusted(KEYS[1])
  if refused then return refused end
  if m.invalid > 0 then return {NOT_EDITABLE, 'invalidated'} end
  if now >= m.ends then return {NOT_EDITABLE, 'ended'} end
  local ends = tonumber(ARGV[2])
  if ends < m.ends then return {NOT_EDITABLE, 'earlier'} end
  redis.call('HSET', KEYS[1], 'ends', ARGV[2])
  return {OK, 1}
end

if m then
  if mode == 'ensure' then return {OK, 0} end
  if m.invalid > 0 then return {NOT_EDITABLE, 'invalidated'} end
  if now >= m.starts then return {NOT_EDITABLE, 'started'} end
elseif mode == 'ensure' and now >= tonumber(ARGV[3]) then
  return {RECOVERING, 'missing'}
end

redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'starts', ARGV[3], 'ends', ARGV[4], 'limit', ARGV[5],
  'hold', ARGV[6], 'team_size', ARGV[7], 'team_ttl', ARGV[8], 'invalid', ARGV[9],
  'order_limit', ARGV[10], 'auto', ARGV[11], 'min_pay', ARGV[12], 'node', node_id())
for i = 13, #ARGV, 4 do
  local sku = ARGV[i]
  redis.call('HSET', KEYS[2], '$:' .. sku, ARGV[i + 1], 'i:' .. sku, ARGV[i + 2],
    'a:' .. sku, ARGV[i + 2], 'h:' .. sku, 0, 'p:' .. sku, 0, 'r:' .. sku, 0)
  if ARGV[i + 3] ~= '' then redis.call('HSET', KEYS[2], 'l:' .. sku, ARGV[i + 3]) end
end
return {OK, 1}
