-- lib/order.lua: the order record. Requires lib/common.lua.
--
-- Order record, one field of the campaign's `orders` hash (order id -> record):
--   user|sku|qty|amount|state|created_ms|deadline_ms|version|kind|team|payment_ref
--   state: H held, P paid, C cancelled, E expired, R refunded; kind: f flash, t team;
--   version: 1 at creation, +1 on every state change (the durable store keeps the highest).

-- The outbox event of each state an order enters (docs/events.md).
local STATE_EVENT = {H = 'order.reserved', P = 'order.paid', C = 'order.cancelled',
  E = 'order.expired', R = 'order.refunded'}

local function encode_order(o)
  return table.concat({o.user, o.sku, string.format('%d', o.qty), string.format('%d', o.amount),
    o.state, string.format('%d', o.created),
    string.format('%d', o.deadline), o.version, o.kind, o.team, o.payref}, '|')
end

local function decode_order(id, raw)
  local f = split(raw)
  return {id = id, user = f[1], sku = f[2], qty = tonumber(f[3]), amount = tonumber(f[4]),
    state = f[5], created = tonumber(f[6]), deadline = tonumber(f[7]), version = tonumber(f[8]),
    kind = f[9], team = f[10], payref = f[11]}
end
