-- lib/team.lua: the team record and its joinable-index entry. Requires lib/common.lua.
--
-- Team record, one field of the campaign's `teams` hash (team id -> record):
--   leader|sku|qty|size|state|created_ms|opened_ms|expires_ms|held|paid|version|why|members
--   state: W pending (leader unpaid), O open, S succeeded, F failed, D dissolved
--   qty: units per seat (every member buys the leader's qty); held/paid: seats in each state
--   why: '' | expired | invalidated | leader_unpaid | leader_cancelled (how F/D came about)
--   members: the seats taken (held or paid), leader first, as "order_id=user,order_id=user"
-- A decoded team keeps its seats twice: `members` ({order, user} each) to look them up and
-- `seats` (each seat's encoded "order_id=user") so that encoding never re-joins old seats.
--
-- Joinable index, the campaign's `joinable` zset (all scores 0, ordered by member):
--   "<sku>|<remaining seats, 3 digits>|<expires_ms, 13 digits>|<team id>"
-- so a lexicographic range over one sku lists its open teams fewest-remaining-first, then
-- earliest expiry (Pinduoduo-style matching). Exactly the open teams with a free seat are
-- indexed (lib/ctx.lua keeps it so). Open teams also sit in `team_deadlines` (team id ->
-- expires_ms) for the reaper.

-- The outbox event of each state a team enters (docs/events.md).
local TEAM_EVENT = {W = 'team.created', O = 'team.opened', S = 'team.succeeded',
  F = 'team.failed', D = 'team.dissolved'}

local function decode_team(id, raw)
  local f = split(raw)
  local t = {id = id, leader = f[1], sku = f[2], qty = tonumber(f[3]), size = tonumber(f[4]),
    state = f[5], created = tonumber(f[6]), opened = tonumber(f[7]), expires = tonumber(f[8]),
    held = tonumber(f[9]), paid = tonumber(f[10]), version = tonumber(f[11]), why = f[12],
    members = {}, seats = {}}
  for entry in string.gmatch(f[13], '[^,]+') do
    local eq = string.find(entry, '=', 1, true)
    t.members[#t.members + 1] = {order = string.sub(entry, 1, eq - 1),
      user = string.sub(entry, eq + 1)}
    t.seats[#t.seats + 1] = entry
  end
  return t
end

local function encode_team(t)
  return table.concat({t.leader, t.sku, string.format('%d', t.qty), t.size, t.state,
    string.format('%d', t.created), string.format('%d', t.opened),
    string.format('%d', t.expires), t.held, t.paid, t.version, t.why,
    table.concat(t.seats, ',')}, '|')
end

local function add_member(t, order_id, user)
  t.members[#t.members + 1] = {order = order_id, user = user}
  t.seats[#t.seats + 1] = order_id .. '=' .. user
end

local function remove_member(t, i)
  table.remove(t.members, i)
  table.remove(t.seats, i)
end

local function member_index(t, user)
  for i, m in ipairs(t.members) do
    if m.user == user then return i end
  end
  return nil
end

-- The joinable entry team t has as it is now, or false when it is not joinable.
local function index_entry(t)
  if t.state ~= 'O' or t.held + t.paid >= t.size then return false end
  return t.sku .. '|' .. string.format('%03d', t.size - t.held - t.paid) .. '|' ..
    string.format('%013d', t.expires) .. '|' .. t.id
end
