-- Reads a room's cluster-wide counts without reporting any: the rooms API (docs/protocol.md,
-- "Rooms API"). KEYS[1] the room's presence hash (node id -> "hosts viewers expires_at_ms", as
-- presence.lua writes it). Fields past their expiry (Redis' own clock) are not counted; this
-- script changes nothing (presence.lua deletes them at its next report).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hosts, viewers = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local h, v, exp = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if exp and tonumber(exp) > now then
    hosts = hosts + tonumber(h)
    viewers = viewers + tonumber(v)
  end
end
return {hosts, viewers}
