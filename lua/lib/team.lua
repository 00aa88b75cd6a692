-- team.lua: team helpers, prepended after common.lua to every script (see engine/scripts.py).
--
-- Team record, one field of the campaign's `teams` hash (team id -> record):
--   leader|sku|qty|size|state|created_ms|opened_ms|expires_ms|held|paid|version|why|members
--   state: W pending (leader unpaid), O open, S succeeded, F failed, D dissolved
--   qty: units per seat (every member buys the leader's qty); held/paid: seats in each state
--   why: '' | expired | invalidated | leader_unpaid | leader_cancelled (how F/D came about)
--   members: the seats taken (held or paid), leader first, as "order_id=user,order_id=user"
--
-- Joinable index, the campaign's `joinable` zset (all scores 0, ordered by member):
--   "<sku>|<remaining seats, 3 digits>|<expires_ms, 13 digits>|<team id>"
-- so a lexicographic range over one sku lists its open teams fewest-remaining-first, then
-- earliest expiry (Pinduoduo-style matching). Only open teams with a free seat are indexed.
-- Open teams also sit in `team_deadlines` (team id -> expires_ms) for the reaper.

local TEAM_EVENT = {W = 'team.created', O = 'team.opened', S = 'team.succeeded',
  F = 'team.failed', D = 'team.dissolved'}

local function load_team(teams_key, id)
  local raw = redis.call('HGET', teams_key, id)
  if not raw then return nil end
  local f = split(raw)
  local t = {id = id, leader = f[1], sku = f[2], qty = tonumber(f[3]), size = tonumber(f[4]),
    state = f[5], created = tonumber(f[6]), opened = tonumber(f[7]), expires = tonumber(f[8]),
    held = tonumber(f[9]), paid = tonumber(f[10]), version = tonumber(f[11]), why = f[12],
    members = {}}
  if f[13] ~= '' then
    for entry in string.gmatch(f[13], '[^,]+') do
      local eq = string.find(entry, '=', 1, true)
      t.members[#t.members + 1] = {order = string.sub(entry, 1, eq - 1),
        user = string.sub(entry, eq + 1)}
    end
  end
  return t
end

local function encode_team(t)
  local seats = {}
  for i, m in ipairs(t.members) do seats[i] = m.order .. '=' .. m.user end
  return table.concat({t.leader, t.sku, string.format('%d', t.qty), t.size, t.state, string.format('%d', t.created),
    string.format('%d', t.opened), string.format('%d', t.expires), t.held, t.paid, t.version,
    t.why, table.concat(seats, ',')}, '|')
end

local function index_entry(t)
  return t.sku .. '|' .. string.format('%03d', t.size - t.held - t.paid) .. '|' ..
    string.format('%013d', t.expires) .. '|' .. t.id
end

-- Drop the team's joinable entry; call before changing seats, state or expiry.
local function unindex(k, t)
  if t.state == 'O' then redis.call('ZREM', k.joinable, index_entry(t)) end
end

-- Index the team again if it is open with a free seat; call after the change.
local function reindex(k, t)
  if t.state == 'O' and t.held + t.paid < t.size then
    redis.call('ZADD', k.joinable, 0, index_entry(t))
  end
end

-- Store the team and append its event: `etype` defaults to the state's own event.
local function save_team(k, t, at, reason, etype, order_id)
  t.version = t.version + 1
  local raw = encode_team(t)
  redis.call('HSET', k.teams, t.id, raw)
  redis.call('XADD', k.events, '*', 'type', etype or TEAM_EVENT[t.state], 'team', t.id,
    'record', raw, 'order', order_id or '', 'at', string.format('%d', at), 'reason', reason)
end

local function member_index(t, user)
  for i, m in ipairs(t.members) do
    if m.user == user then return i end
  end
  return nil
end

-- A held seat ended (cancelled or expired): free it; a pending team whose leader's hold ended
-- is dissolved. Call after the order itself was released.
local function seat_released(k, o, at, reason)
  local t = load_team(k.teams, o.team)
  if not t then return end
  if t.state == 'W' then
    t.state = 'D'
    t.held = 0
    if reason == 'user' then
      t.why = 'leader_cancelled'
    elseif reason == 'invalidated' then
      t.why = 'invalidated'
    else
      t.why = 'leader_unpaid'
    end
    save_team(k, t, at, reason, nil, o.id)
    return
  end
  local i = member_index(t, o.user)
  if t.state ~= 'O' or not i or t.members[i].order ~= o.id then return end
  unindex(k, t)
  table.remove(t.members, i)
  t.held = t.held - 1
  reindex(k, t)
  save_team(k, t, at, reason, 'team.seat_released', o.id)
end

-- Fail an open team: refund every paid seat (stock back), expire every held seat.
local function fail_team(k, t, now, why)
  unindex(k, t)
  redis.call('ZREM', k.team_deadlines, t.id)
  for _, seat in ipairs(t.members) do
    local o = load_order(k.orders, seat.order)
    if o and o.state == 'P' then
      move(k.inv, o.sku, 'p', 'a', o.qty)
      redis.call('HINCRBY', k.users, o.user, -o.qty)
      o.state = 'R'
      save_order(k.orders, k.events, o, now, 'team_failed')
    elseif o and o.state == 'H' then
      release_hold(k, o, why == 'invalidated' and 'C' or 'E', now, 'team_failed')
    end
  end
  t.state = 'F'
  t.why = why
  t.held = 0
  save_team(k, t, now, why)
end
