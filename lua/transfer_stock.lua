-- transfer_stock.lua: move available units of one item between two stock buckets of a sharded
-- flash campaign (engine/shards.py). The buckets live on different slots and no script spans
-- two slots, so a transfer is three steps, each atomic on one bucket, each safe to repeat:
--   1. 'debit'  on the source: available and its share of the stock go down by the units,
--               and a pending record of the transfer is kept there (`transfers`);
--   2. 'credit' on the destination: available and its share go up, exactly once per transfer
--               (the destination remembers every transfer it was credited, `credits`);
--   3. 'settle' on the source: the pending record goes.
-- Whoever finds a pending record (engine/shards.py finish) credits then settles it, so a
-- process that dies after any step loses no unit and creates none: per item, the shares of
-- every bucket plus the units of pending records not yet credited equal the initial stock.
-- A repair rebuilds every bucket from SQL under a new `epoch` (engine/recovery.py); a
-- transfer debited before it is void (the rebuild counted its units), so a credit of another
-- epoch is refused ('stale').
-- uses: lib/common.lua
--
-- ARGV[1] mode
-- 'peek'    KEYS[1] meta  KEYS[2] inv  KEYS[3] transfers   ARGV[2] sku
--           returns {0, available (-1: no such sku), credits so far, epoch,
--                    xid_1, record_1, xid_2, record_2, ...}: every pending transfer out of
--                    this bucket, record "<destination shard>|<sku>|<units>|<epoch>|<ms>"
-- 'debit'   KEYS[1] meta  KEYS[2] inv  KEYS[3] transfers
--           ARGV[2] sku  ARGV[3] at most these units  ARGV[4] at least these
--           ARGV[5] the destination's shard id  ARGV[6] this bucket's shard id
--           only while the campaign is active (a sale in progress)
--           returns {0, xid, units, epoch}   debited, pending until settled
--                   {5, available}           fewer than ARGV[4] units available here
--                   {1, sku} | {4} | {2, starts_ms} | {3, ends_ms}
--                                            no such sku | invalidated | not started | ended
-- 'credit'  KEYS[1] meta  KEYS[2] inv  KEYS[3] credits
--           ARGV[2] xid  ARGV[3] sku  ARGV[4] units  ARGV[5] the transfer's epoch
--           returns {0, 1} credited now | {0, 0} credited before | {12, 'stale'} void
-- 'settle'  KEYS[1] transfers  ARGV[2] xid   (only once the credit answered)
--           returns {0, 1 | 0}   the pending record deleted (0: it was not there)
-- 'peek', 'debit' and 'credit' answer {18, why} while the bucket awaits a repair
-- (lib/common.lua untrusted).
local mode = ARGV[1]

if mode == 'settle' then
  return {OK, redis.call('HDEL', KEYS[1], ARGV[2])}
end

local refused = untrusted(KEYS[1])
if refused then return refused end
local meta, inv = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch') or '0'

if mode == 'peek' then
  local reply = {OK, tonumber(redis.call('HGET', inv, 'a:' .. ARGV[2]) or '-1'),
    tonumber(redis.call('HGET', meta, 'xin') or '0'), epoch}
  for _, v in ipairs(redis.call('HGETALL', KEYS[3])) do reply[#reply + 1] = v end
  return reply
end

local function credit(xid, sku, units, of_epoch)
  if of_epoch ~= epoch then return {NOT_EDITABLE, 'stale'} end
  if redis.call('HSETNX', KEYS[3], xid, units) == 0 then return {OK, 0} end
  redis.call('HINCRBY', inv, 'a:' .. sku, units)
  redis.call('HINCRBY', inv, 'i:' .. sku, units)
  redis.call('HDEL', inv, 'out:' .. sku)  -- on sale here again: 'out' marks its next sell-out
  redis.call('HINCRBY', meta, 'xin', 1)
  return {OK, 1}
end

local function debit(sku, most, least, destination, source)
  local m, now = load_meta(meta), now_ms()
  if m.invalid > 0 then return {INVALIDATED} end
  if now < m.starts then return {NOT_STARTED, string.format('%d', m.starts)} end
  if now >= m.ends then return {ENDED, string.format('%d', m.ends)} end
  local available = tonumber(redis.call('HGET', inv, 'a:' .. sku))
  if not available then return {NOT_FOUND, sku} end
  local units = math.min(available, most)
  if units < least or units <= 0 then return {SOLD_OUT, available} end
  local xid = source .. ':' .. epoch .. ':' .. redis.call('HINCRBY', meta, 'xseq', 1)
  local at = string.format('%d', now)
  redis.call('HINCRBY', inv, 'a:' .. sku, -units)
  redis.call('HINCRBY', inv, 'i:' .. sku, -units)
  if units == available then redis.call('HSETNX', inv, 'out:' .. sku, at) end
  redis.call('HSET', KEYS[3], xid, table.concat({destination, sku, units, epoch, at}, '|'))
  return {OK, xid, units, epoch}
end

if mode == 'credit' then return credit(ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]) end
return debit(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6])
