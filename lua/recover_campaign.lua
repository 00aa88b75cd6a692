-- recover_campaign.lua: the fence around a campaign whose Redis state is being repaired from
-- SQL (engine/recovery.py), and the repair's lock.
-- uses: lib/common.lua
--
-- KEYS[1] meta   KEYS[2] the repair lock (string: the repairing process's token)
-- ARGV[1] mode   'fence'  ARGV[2] why: every script that changes the campaign answers
--                         {18, 'fenced'} from now on (lib/common.lua untrusted); nothing
--                         when the campaign has no definition here
--                'take'   ARGV[2] token, ARGV[3] ms: take the lock for that long, or extend it
--                         when this token holds it
--                'lift'   ARGV[2] token, ARGV[3] gap (0 when absent): the repair or the
--                         verification is done: record this server's replication id as the one
--                         the state was verified on, move the order and team sequences on by
--                         the gap (ids a lost write may have handed out are never reused), lift
--                         the fence, free the lock
--                'free'   ARGV[2] token: free the lock, changing nothing else
-- returns {0}        done
--         {12, who}  'take', 'lift' or 'free': another token holds the lock (who)
local mode, meta, lock = ARGV[1], KEYS[1], KEYS[2]
if mode == 'fence' then
  -- A campaign with no definition here answers 'missing' already; fencing it would leave a
  -- stray meta key behind (an archived campaign's, say).
  if redis.call('HEXISTS', meta, 'kind') == 1 then redis.call('HSET', meta, 'fence', ARGV[2]) end
  return {OK}
end
local holder = redis.call('GET', lock)
if holder and holder ~= ARGV[2] then return {NOT_EDITABLE, holder} end
if mode == 'take' then
  redis.call('SET', lock, ARGV[2], 'PX', tonumber(ARGV[3]))
  return {OK}
end
if not holder then return {NOT_EDITABLE, ''} end
if mode == 'free' then
  redis.call('DEL', lock)
  return {OK}
end
local gap = tonumber(ARGV[3] or '0')
if gap > 0 then
  redis.call('HINCRBY', meta, 'oseq', gap)
  redis.call('HINCRBY', meta, 'tseq', gap)
end
redis.call('HSET', meta, 'node', node_id())
redis.call('HDEL', meta, 'fence')
redis.call('DEL', lock)
return {OK}
