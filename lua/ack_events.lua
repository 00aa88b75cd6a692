-- ack_events.lua: the flush worker committed these outbox entries to SQL: acknowledge them in
-- its consumer group and delete them from the stream in one step, so only acknowledged
-- entries are ever trimmed (never a blind MAXLEN) and none is left acknowledged but kept.
-- The ids go to XACK and XDEL 1,000 at a time: Lua's unpack takes a few thousand values at
-- most, and a batch that grew with its stream's backlog holds more.
--
-- KEYS[1] events  stream  the campaign's outbox
-- ARGV[1] consumer group   ARGV[2..] entry ids
-- returns {acknowledged}   how many entries were acknowledged
local acked = 0
for first = 2, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
end
return {acked}
