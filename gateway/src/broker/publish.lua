-- Publishes one message into a room, atomically for the whole cluster (docs/protocol.md,
-- "Continuity"): idempotency check, next offset, epoch creation, history append, publish.
--
-- KEYS[1]  {prefix}{room}:meta        hash: epoch, seq
-- KEYS[2]  {prefix}{room}:hist        stream of entries 0-<offset> with fields t (ms), f (frame)
-- KEYS[3]  {prefix}{room}:idem:<key>  optional: "offset:epoch:id" of the first publish with key
-- ARGV[1]  the message frame without its closing "}" (the node encodes it once)
-- ARGV[2]  history size (entries per room; 0 = no history)
-- ARGV[3]  history TTL, ms
-- ARGV[4]  idempotency TTL, ms
-- ARGV[5]  publish command: PUBLISH, or SPUBLISH in Redis Cluster mode
-- ARGV[6]  the room's channel
-- ARGV[7]  meta TTL, ms
-- ARGV[8]  the message id
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
local epoch = redis.call('HGET', KEYS[1], 'epoch')
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
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local off = string.format('%d', seq)
local frame = ARGV[1] .. ',"offset":' .. off .. ',"epoch":"' .. epoch .. '"}'

if tonumber(ARGV[2]) > 0 then
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '0-' .. off, 't', string.format('%d', now), 'f', frame)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if KEYS[3] then
  redis.call('SET', KEYS[3], off .. ':' .. epoch .. ':' .. ARGV[8], 'PX', ARGV[4])
end
redis.call(ARGV[5], ARGV[6], frame)
return {seq, epoch, 0, ARGV[8]}
