-- pay_order.lua: record the payment of a held order by its owner. For a team order: the
-- leader's payment opens the team (its clock starts now); the last paid seat makes it succeed.
-- uses: lib/common.lua lib/order.lua lib/team.lua lib/ctx.lua
--
-- KEYS[1..10] the campaign's order keys (engine/keys.py order_keys)
-- ARGV[1] order id   ARGV[2] user id   ARGV[3] payment reference
-- ARGV[4] the amount paid, in minor units ('' when the gateway does not say)
-- ARGV[5] seconds the `idem` hash lives after its last write (FLASHTEAM_IDEMPOTENCY_TTL)
-- A payment reference pays one order: the campaign's `idem` hash keeps ":<reference>" ->
-- "p<order seq>" (a user id never starts with ':', so no idempotency record shares the
-- field; lib/ops.lua).
-- returns {0, order_id, record, 0[, team_id, team_record, opened]}
--                                 paid now, or already paid with this same reference
--         {1}                     no such order
--         {9}                     the order belongs to another user
--         {21, amount}            the amount paid is not the order's amount
--         {20}                    the payment reference paid another order
--         {10}                    the hold ran out (expired, or past its deadline)
--         {4}                     the campaign was invalidated
--         {11, state}             not held (cancelled, refunded, or paid with another reference)
--         {14, team_state}        the order's team is no longer pending or open
--         {18, why}  the campaign awaits a repair (lib/common.lua untrusted)
local refused = untrusted(KEYS[1])
if refused then return refused end
local ctx = new_ctx(order_keys(), nil, nil, nil, tonumber(ARGV[5]))
local id, user, payref, paid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ref_field = ':' .. payref
local paid_as = 'p' .. string.match(id, '%.o(%d+)$')

local o = ctx_order(ctx, id)
if not o then return {NOT_FOUND} end
if o.user ~= user then return {FORBIDDEN} end
if paid ~= '' and tonumber(paid) ~= o.amount then
  return {AMOUNT_MISMATCH, string.format('%d', o.amount)}
end
if o.state == 'P' and o.payref == payref then return order_reply(ctx, id) end
local paid_order = redis.call('HGET', ctx.k.idem, ref_field)
if paid_order and paid_order ~= paid_as then return {PAYMENT_REF_USED} end
if o.state == 'E' then return {HOLD_EXPIRED} end
if o.state ~= 'H' then return {INVALID_STATE, o.state} end
if ctx.now >= o.deadline then return {HOLD_EXPIRED} end
local m = ctx_meta(ctx)
if m.invalid > 0 then return {INVALIDATED} end
local t = nil
if o.kind == 't' then
  t = ctx_team(ctx, o.team)
  if t.state ~= 'W' and t.state ~= 'O' then return {TEAM_CLOSED, t.state} end
end

-- The seat changes from held to paid; a pending team opens (joinable from now on), a full
-- one succeeds.
local function team_paid()
  touch_index(ctx, t)
  t.held = t.held - 1
  t.paid = t.paid + 1
  if t.state == 'W' then
    t.state = 'O'
    t.opened = ctx.now
    t.expires = ctx.now + m.team_ttl
    redis.call('ZADD', ctx.k.team_deadlines, t.expires, t.id)
    emit_team(ctx, t, 'user', nil, id)
  elseif t.paid == t.size then
    t.state = 'S'
    redis.call('ZREM', ctx.k.team_deadlines, t.id)
    emit_team(ctx, t, 'user', nil, id)
  else
    emit_team(ctx, t, 'user', 'team.seat_paid', id)
  end
end

return run_ops(ctx, function()
  move(ctx, o.sku, 'h', 'p', o.qty)
  unschedule(ctx, id)
  o.state = 'P'
  o.payref = payref
  ctx.idem[ref_field] = paid_as
  emit_order(ctx, o, 'user')
  if t then team_paid() end
  return order_reply(ctx, id)
end)
