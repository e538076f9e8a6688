-- Publishes one message into a room, atomically for the whole cluster (docs/protocol.md,
-- "Continuity"): idempotency check, next offset, epoch creation, history append, publish.
--
-- KEYS[1]  {prefix}{room}:meta        hash: epoch, seq, bytes (the frame bytes in the stream)
-- KEYS[2]  {prefix}{room}:hist        stream of entries 0-<offset> with fields t (ms), f (frame)
-- KEYS[3]  {prefix}{room}:idem:<scope>:<key>  optional: "offset:epoch:id" of the first publish
--          with key by that publisher (u:<sub>, api:<id>, api, anon; docs/protocol.md 11.3)
-- ARGV[1]  the message frame without its closing "}" (the node encodes it once)
-- ARGV[2]  history size (entries per room; 0 = no history)
-- ARGV[3]  history TTL, ms
-- ARGV[4]  idempotency TTL, ms
-- ARGV[5]  publish command: PUBLISH, or SPUBLISH in Redis Cluster mode
-- ARGV[6]  the room's channel
-- ARGV[7]  meta TTL, ms
-- ARGV[8]  the message id
-- ARGV[9]  history bytes per room (optional, default 1572864): the oldest entries are trimmed
--          until the room's frames sum to at most this
-- Returns {offset, epoch, duplicate (0|1), id}.

if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local off, ep, id = string.match(seen, '^(%d+):(%w+):(.*)$')
    if off then
      return {tonumber(off), ep, 1, id}
    end
  end
end

local t = redis.call('TIME')
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'bytes')
local epoch = meta[1]
if not epoch then
  -- A new sequence (the room is new, its meta expired, or Redis lost it): a new epoch from the
  -- server's clock in microseconds, base 36, and no history of an older epoch.
  local n = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  epoch = ''
  while n > 0 do
    local d = n % 36
    epoch = string.sub(digits, d + 1, d + 1) .. epoch
    n = math.floor(n / 36)
  end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'bytes', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local off = string.format('%d', seq)
local frame = ARGV[1] .. ',"offset":' .. off .. ',"epoch":"' .. epoch .. '"}'

local size = tonumber(ARGV[2])
if size > 0 then
  local max_bytes = tonumber(ARGV[9] or '1572864')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local len = redis.call('XLEN', KEYS[2])
  -- The running total of the stream's frame bytes lives in the meta, so that trimming costs
  -- what it trims, not a scan of the history. A stream that expired (--history-ttl is shorter
  -- than the meta's life) took its bytes with it.
  local bytes = 0
  if len > 0 then
    local recorded = meta[2]
    if recorded then
      bytes = tonumber(recorded)
    else
      -- A stream written before the total was kept (an older node): count it once.
      local all = redis.call('XRANGE', KEYS[2], '-', '+')
      for i = 1, #all do
        bytes = bytes + #all[i][2][4]
      end
    end
  end
  redis.call('XADD', KEYS[2], '0-' .. off, 't', string.format('%d', now), 'f', frame)
  len = len + 1
  bytes = bytes + #frame
  -- Trim from the oldest, by count and by bytes; the new entry itself goes when it alone is
  -- larger than the budget.
  while len > 0 and (len > size or bytes > max_bytes) do
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    if not oldest then
      break
    end
    bytes = bytes - #oldest[2][4]
    redis.call('XDEL', KEYS[2], oldest[1])
    len = len - 1
  end
  if len == 0 then
    bytes = 0
  end
  redis.call('HSET', KEYS[1], 'bytes', bytes)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if KEYS[3] then
  redis.call('SET', KEYS[3], off .. ':' .. epoch .. ':' .. ARGV[8], 'PX', ARGV[4])
end
redis.call(ARGV[5], ARGV[6], frame)
return {seq, epoch, 0, ARGV[8]}
