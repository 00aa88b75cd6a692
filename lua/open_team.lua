-- open_team.lua: a leader opens a team: their units are held like a flash order and the team
-- is pending until the leader pays (pay_order.lua then opens it and starts its clock).
--
-- KEYS[1..9] the campaign's order keys (engine/keys.py order_keys)
-- KEYS[10] idem  string  this (user, idempotency key)'s record
-- KEYS[11] rl    string  this user's attempts in the current second
-- ARGV[1] campaign id  ARGV[2] leader user id  ARGV[3] sku  ARGV[4] qty per seat (>= 1)
-- ARGV[5] rate limit per second (0 = off)      ARGV[6] idempotency TTL (s)
-- returns {0, order_id, record, replayed, team_id, team_record, 1}   opened (or a retry)
--         {8} | {7, retry_after_ms}             key reused differently | too many attempts
--         {1} | {4} | {17}                      no campaign | invalidated | not a team campaign
--         {2, starts_ms} | {3, ends_ms}         not started | ended (no new teams after the end)
--         {1, sku} | {6, units_left} | {5, available}   unknown sku | limit | sold out
local k = order_keys()
local cid, user, sku, qty = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fingerprint = 'open:' .. sku .. ':' .. ARGV[4]

local prior = replay(k, KEYS[10], fingerprint)
if prior then return prior end
local wait = rate_limited(KEYS[11], tonumber(ARGV[5]))
if wait then return {RATE_LIMITED, wait} end

local now = now_ms()
local m = load_meta(k.meta)
local closed = gate_reply(m, now, 'team')
if closed then return closed end
local blocked = seat_blocked(k, m, user, sku, qty)
if blocked then return blocked end

local id = open_pending_team(k, m, user, sku, qty, now, cid)
remember(KEYS[10], id, fingerprint, tonumber(ARGV[6]))
return order_reply(k, id, 0)
