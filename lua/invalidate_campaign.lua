-- invalidate_campaign.lua: the merchant ends a campaign early. From this step on no order,
-- team or join is accepted; the reaper (expire_orders.lua) then cancels every held order.
-- uses: lib/common.lua
--
-- KEYS[1] meta   KEYS[2] events
-- returns {0, invalidated_at_ms}   invalidated now, or earlier (a retry returns the first time)
--         {1}                      no such campaign
--         {12, 'ended'}            the campaign already ended on its own
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local m = load_meta(KEYS[1])
if not m then return {NOT_FOUND} end
if m.invalid > 0 then return {OK, string.format('%d', m.invalid)} end
local now = now_ms()
if now >= m.ends then return {NOT_EDITABLE, 'ended'} end
redis.call('HSET', KEYS[1], 'invalid', now)
redis.call('XADD', KEYS[2], '*', 'type', 'campaign.invalidated', 'at', string.format('%d', now),
  'reason', 'merchant')
return {OK, string.format('%d', now)}
