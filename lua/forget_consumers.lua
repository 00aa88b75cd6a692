-- forget_consumers.lua: remove consumers of the flush group that have nothing pending: a dead
-- worker's once another worker claimed its entries, or a worker leaving (`--drain`, a stop).
-- Atomic: a consumer that holds entries is never removed (removing it would drop them from
-- the group's pending list, and they would never be flushed). A live worker removed while
-- idle comes back at its next read.
--
-- KEYS[1] events  stream  the campaign's outbox
-- ARGV[1] consumer group   ARGV[2] idle ms: remove any consumer idle longer than this
-- ARGV[3..] consumers to remove whatever their idle time (a worker leaving)
-- returns {removed}   how many consumers were removed
local named = {}
for i = 3, #ARGV do named[ARGV[i]] = true end
local idle_ms = tonumber(ARGV[2])
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['pending'] == 0 and (named[fields['name']] or fields['idle'] > idle_ms) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    removed = removed + 1
  end
end
return {removed}
