-- quick_join.lua: in one atomic step, seat the user in the open team of this sku with the
-- fewest remaining seats (then the earliest expiry) that the user is not in and can afford
-- (limit, stock for the team's units per seat); when none fits and the campaign is active,
-- open a new pending team led by the user (one unit per seat).
--
-- KEYS[1..9] the campaign's order keys (engine/keys.py order_keys)
-- KEYS[10] idem  string  this (user, idempotency key)'s record
-- KEYS[11] rl    string  this user's attempts in the current second
-- ARGV[1] campaign id  ARGV[2] user id  ARGV[3] sku
-- ARGV[4] rate limit per second (0 = off)  ARGV[5] idempotency TTL (s)
-- ARGV[6] how many index entries to look at before opening a new team
-- returns {0, order_id, record, replayed, team_id, team_record, opened 0|1}
--         {8} | {7, retry_after_ms}          key reused differently | too many attempts
--         {1} | {4} | {17}                   no campaign | invalidated | not a team campaign
--         {2, starts_ms} | {3, ends_ms}      no team to join and none may be opened
--         {1, sku} | {6, units_left} | {5, available}   unknown sku | limit | sold out
local k = order_keys()
local cid, user, sku = ARGV[1], ARGV[2], ARGV[3]
local fingerprint = 'quick:' .. sku

local prior = replay(k, KEYS[10], fingerprint)
if prior then return prior end
local wait = rate_limited(KEYS[11], tonumber(ARGV[4]))
if wait then return {RATE_LIMITED, wait} end

local m = load_meta(k.meta)
if not m then return {NOT_FOUND} end
if m.invalid > 0 then return {INVALIDATED} end
if m.kind ~= 'team' then return {WRONG_KIND} end
local now = now_ms()

local entries = redis.call('ZRANGEBYLEX', k.joinable, '[' .. sku .. '|', '[' .. sku .. '|~',
  'LIMIT', 0, tonumber(ARGV[6]))
for _, entry in ipairs(entries) do
  local t = load_team(k.teams, string.match(entry, '[^|]+$'))
  if t and t.state == 'O' and now < t.expires and not member_index(t, user)
      and t.held + t.paid < t.size and not seat_blocked(k, m, user, sku, t.qty) then
    local id = take_seat(k, m, t, user, now, cid)
    remember(KEYS[10], id, fingerprint, tonumber(ARGV[5]))
    return order_reply(k, id, 0)
  end
end

local closed = gate_reply(m, now, 'team')
if closed then return closed end
local blocked = seat_blocked(k, m, user, sku, 1)
if blocked then return blocked end
local id = open_pending_team(k, m, user, sku, 1, now, cid)
remember(KEYS[10], id, fingerprint, tonumber(ARGV[5]))
return order_reply(k, id, 0)
