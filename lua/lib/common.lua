-- lib/common.lua: what every order, team and campaign script shares: the reply codes, the
-- campaign's keys, the Redis clock, record splitting and the campaign's meta fields.
-- engine/scripts.py sends a script's libraries ahead of it (EVAL has no modules): each script
-- names the ones it uses on its `-- uses:` header line, in this order: common, order, team,
-- ctx, then release or ops.
--
-- Return codes shared by every script (engine/scripts.py Code mirrors them):
--   0 ok, 1 not_found, 2 not_started, 3 ended, 4 invalidated, 5 sold_out, 6 limit_exceeded,
--   7 rate_limited, 8 idempotency_mismatch, 9 forbidden, 10 hold_expired, 11 invalid_state,
--   12 not_editable, 13 team_full, 14 team_closed, 15 already_in_team, 16 team_in_progress,
--   17 wrong_kind, 18 recovering (the campaign's Redis state awaits a repair from SQL),
--   19 order_limit_exceeded (more units in one order than the campaign's per-order cap),
--   20 payment_ref_used (the payment reference paid another order), 21 amount_mismatch (the
--   amount paid is not what the order costs)

local OK, NOT_FOUND, NOT_STARTED, ENDED, INVALIDATED = 0, 1, 2, 3, 4
local SOLD_OUT, LIMIT_EXCEEDED, RATE_LIMITED, IDEMPOTENCY_MISMATCH = 5, 6, 7, 8
local FORBIDDEN, HOLD_EXPIRED, INVALID_STATE, NOT_EDITABLE = 9, 10, 11, 12
local TEAM_FULL, TEAM_CLOSED, ALREADY_IN_TEAM, TEAM_IN_PROGRESS, WRONG_KIND = 13, 14, 15, 16, 17
local RECOVERING, ORDER_LIMIT_EXCEEDED, PAYMENT_REF_USED, AMOUNT_MISMATCH = 18, 19, 20, 21

-- KEYS[1..10] of every order and team script, in this order (engine/keys.py order_keys).
local function order_keys()
  return {meta = KEYS[1], inv = KEYS[2], orders = KEYS[3], users = KEYS[4], deadlines = KEYS[5],
    events = KEYS[6], teams = KEYS[7], joinable = KEYS[8], team_deadlines = KEYS[9],
    idem = KEYS[10]}
end

-- One clock for every host: the Redis server's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The '|'-separated fields of a record (empty fields kept).
local function split(s)
  local out, i = {}, 1
  while true do
    local j = string.find(s, '|', i, true)
    if not j then
      out[#out + 1] = string.sub(s, i)
      return out
    end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

local META_FIELDS = {'kind', 'starts', 'ends', 'limit', 'hold', 'invalid', 'team_size', 'team_ttl',
  'order_limit', 'auto', 'min_pay'}

-- The campaign's definition as the scripts check it (times in ms), nil when it is not warmed.
-- order_limit: units per order at most (0: no cap); auto: the paid seats an open team needs
-- to succeed when its time runs out (0: it fails); min_pay: the time to pay a team must leave
-- to be offered by quick-join and the joinable list. Each 0 when absent.
local function load_meta(meta_key)
  local v = redis.call('HMGET', meta_key, unpack(META_FIELDS))
  if not v[1] then return nil end
  return {kind = v[1], starts = tonumber(v[2]), ends = tonumber(v[3]), limit = tonumber(v[4]),
    hold = tonumber(v[5]), invalid = tonumber(v[6]), team_size = tonumber(v[7]),
    team_ttl = tonumber(v[8]), order_limit = tonumber(v[9]) or 0, auto = tonumber(v[10]) or 0,
    min_pay = tonumber(v[11]) or 0}
end

-- This server's replication id: it changes whenever the server restarts or is promoted (a
-- replica taking over), the moments Redis can lose acknowledged writes, and also when it
-- creates its replication backlog (a replica attached), which loses nothing: a state on
-- another id is checked against SQL (engine/recovery.py verify) before it changes.
local function node_id()
  return string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
end

-- Whether the campaign's Redis state may be changed: nil when it may, else the reply
-- {RECOVERING, why}:
--   'missing'    no definition here (Redis lost it, it was archived, or there is no such
--                campaign): engine/recovery.py looks in SQL
--   'archiving'  sealed for its archival to SQL (archive_campaign.lua): it never changes in
--                Redis again, unless the archival is called off
--   'fenced'     a repair is due or running (`fence` names why)
--   'restarted'  the state was last verified on another server (or before a restart, a
--                promotion, a backlog re-created): engine/recovery.py checks it against SQL
-- Every script that changes a campaign calls it before anything else.
local function untrusted(meta_key)
  local v = redis.call('HMGET', meta_key, 'kind', 'sealed', 'fence', 'node')
  if not v[1] then return {RECOVERING, 'missing'} end
  if v[2] then return {RECOVERING, 'archiving'} end
  if v[3] then return {RECOVERING, 'fenced'} end
  if v[4] ~= node_id() then return {RECOVERING, 'restarted'} end
  return nil
end
