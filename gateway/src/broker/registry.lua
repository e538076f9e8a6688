-- The node registry's heartbeat (docs/protocol.md, "Member lists"): one instance renews its
-- entry, records the rooms it is about to write roster entries or counts in (before the first
-- write) and learns which instances stopped renewing theirs. KEYS[1] the registry (sorted set of
-- instance -> expiry, ms of Redis' clock), KEYS[2] this instance's room set; ARGV[1] instance,
-- ARGV[2] the entry's lifetime (ms), ARGV[3] the room set's lifetime (ms), then rooms to add.
-- Returns 1 if the registry did not hold the instance (its first beat, or it was reaped while
-- it could not beat: its entries are gone and must be written again), else 0, then the expired
-- instances (at most 16 per beat).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if #ARGV > 3 then
  redis.call('SADD', KEYS[2], unpack(ARGV, 4))
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
end
local answer = {added}
for _, i in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)) do
  answer[#answer + 1] = i
end
return answer
