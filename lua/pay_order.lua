-- pay_order.lua: record the payment of a held order by its owner. For a team order: the
-- leader's payment opens the team (its clock starts now); the last paid seat makes it succeed.
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] order id   ARGV[2] user id   ARGV[3] payment reference
-- returns {0, order_id, record, 0[, team_id, team_record, opened]}
--                                 paid now, or already paid with this same reference
--         {1}                     no such order
--         {9}                     the order belongs to another user
--         {10}                    the hold ran out (expired, or past its deadline)
--         {4}                     the campaign was invalidated
--         {11, state}             not held (cancelled, refunded, or paid with another reference)
--         {14, team_state}        the order's team is no longer pending or open
local k = order_keys()
local id, user, payref = ARGV[1], ARGV[2], ARGV[3]

local o = load_order(k.orders, id)
if not o then return {NOT_FOUND} end
if o.user ~= user then return {FORBIDDEN} end
if o.state == 'P' and o.payref == payref then return order_reply(k, id, 0) end
if o.state == 'E' then return {HOLD_EXPIRED} end
if o.state ~= 'H' then return {INVALID_STATE, o.state} end
local now = now_ms()
if now >= o.deadline then return {HOLD_EXPIRED} end
local m = load_meta(k.meta)
if m.invalid > 0 then return {INVALIDATED} end
local t = nil
if o.kind == 't' then
  t = load_team(k.teams, o.team)
  if t.state ~= 'W' and t.state ~= 'O' then return {TEAM_CLOSED, t.state} end
end

move(k.inv, o.sku, 'h', 'p', o.qty)
redis.call('ZREM', k.deadlines, id)
o.state = 'P'
o.payref = payref
save_order(k.orders, k.events, o, now, 'user')
if t then
  t.held = t.held - 1
  t.paid = t.paid + 1
  if t.state == 'W' then
    t.state = 'O'
    t.opened = now
    t.expires = now + m.team_ttl
    redis.call('ZADD', k.team_deadlines, t.expires, t.id)
    reindex(k, t)
    save_team(k, t, now, 'user', nil, id)
  elseif t.paid == t.size then
    t.state = 'S'
    redis.call('ZREM', k.team_deadlines, t.id)
    save_team(k, t, now, 'user', nil, id)
  else
    save_team(k, t, now, 'user', 'team.seat_paid', id)
  end
end
return order_reply(k, id, 0)
