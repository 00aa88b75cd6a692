-- list_teams.lua: the joinable teams of one item for a product page (read only): open, not
-- full, with the campaign's time to pay left (min_pay, lib/common.lua), without the viewer;
-- fewest remaining seats first, then earliest expiry.
-- uses: lib/common.lua lib/team.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] sku   ARGV[2] viewer user id ('' = anonymous)   ARGV[3] at most this many teams
-- returns {now_ms, team_id, team_record, team_id, team_record, ...}, or {} when the campaign
--         does not exist
local k = order_keys()
if redis.call('EXISTS', k.meta) == 0 then return {} end
local min_pay = tonumber(redis.call('HGET', k.meta, 'min_pay')) or 0
local sku, viewer, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local out = {string.format('%d', now)}
local entries = redis.call('ZRANGEBYLEX', k.joinable, '[' .. sku .. '|', '[' .. sku .. '|~',
  'LIMIT', 0, limit * 4 + 16)
for _, entry in ipairs(entries) do
  local id = string.match(entry, '[^|]+$')
  local raw = redis.call('HGET', k.teams, id)
  local t = raw and decode_team(id, raw)
  if t and t.state == 'O' and now < t.expires and t.expires - now >= min_pay
      and t.held + t.paid < t.size
      and (viewer == '' or not member_index(t, viewer)) then
    out[#out + 1] = id
    out[#out + 1] = raw
    if #out > limit * 2 then break end
  end
end
return out
