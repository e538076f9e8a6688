-- Reports one node's counts of one room and returns the room's cluster-wide counts.
-- KEYS[1] the room's presence hash (node id -> "hosts viewers expires_at_ms");
-- ARGV[1] node id, ARGV[2] hosts, ARGV[3] viewers, ARGV[4] time to live (ms).
--
-- Expiry uses Redis' own clock (TIME), so nodes' clocks do not matter; fields of nodes that
-- stopped reporting are ignored and deleted once expired, and the whole key expires when no node
-- reports any more. Negative counts withdraw the node's field (its last member left).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
if tonumber(ARGV[2]) >= 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (now + ttl))
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local hosts, viewers = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local h, v, exp = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if exp and tonumber(exp) > now then
    hosts = hosts + tonumber(h)
    viewers = viewers + tonumber(v)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return {hosts, viewers}
