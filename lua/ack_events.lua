-- ack_events.lua: the flush worker committed these outbox entries to SQL: acknowledge them in
-- its consumer group and delete them from the stream in one step, so only acknowledged
-- entries are ever trimmed (never a blind MAXLEN) and none is left acknowledged but kept.
--
-- KEYS[1] events  stream  the campaign's outbox
-- ARGV[1] consumer group   ARGV[2..] entry ids
-- returns {acknowledged}   how many entries were acknowledged
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return {acked}
