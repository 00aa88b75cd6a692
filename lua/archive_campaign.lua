-- archive_campaign.lua: the seal around a campaign being archived out of Redis into SQL
-- (engine/archive.py). A sealed campaign never changes in Redis again: every script that
-- changes it answers {18, 'archiving'} (lib/common.lua untrusted), so the comparison with SQL
-- that follows stays true until its keys are deleted.
-- uses: lib/common.lua
--
-- KEYS[1] meta   KEYS[2] deadlines   KEYS[3] team_deadlines   KEYS[4] events
-- KEYS[5] transfers (a sharded campaign's stock transfers out of this bucket not settled,
--         lua/transfer_stock.lua; always empty for one bucket)
-- ARGV[1] mode   'seal'    seal the campaign if it is over and quiet; sealing a sealed one is
--                          a no-op
--                'unseal'  call the archival off: the campaign is live in Redis again
-- returns {0}              done
--         {1}              no such campaign here
--         {12, why}        'seal': not archivable yet: 'live' (not ended or invalidated),
--                          'holds' (held orders), 'teams' (open teams), 'unflushed' (outbox),
--                          'transfers' (a stock transfer to finish first)
--         {18, why}        'seal': the campaign awaits a repair (lib/common.lua untrusted)
local mode, meta = ARGV[1], KEYS[1]
if mode == 'unseal' then
  redis.call('HDEL', meta, 'sealed')
  return {OK}
end
local refused = untrusted(meta)
if refused then
  if refused[2] == 'archiving' then return {OK} end
  if refused[2] == 'missing' then return {NOT_FOUND} end
  return refused
end
local m = load_meta(meta)
if m.invalid == 0 and now_ms() < m.ends then return {NOT_EDITABLE, 'live'} end
if redis.call('ZCARD', KEYS[2]) > 0 then return {NOT_EDITABLE, 'holds'} end
if redis.call('ZCARD', KEYS[3]) > 0 then return {NOT_EDITABLE, 'teams'} end
if redis.call('XLEN', KEYS[4]) > 0 then return {NOT_EDITABLE, 'unflushed'} end
if redis.call('HLEN', KEYS[5]) > 0 then return {NOT_EDITABLE, 'transfers'} end
redis.call('HSET', meta, 'sealed', now_ms())
return {OK}
