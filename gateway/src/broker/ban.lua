-- Stores a ban field and sets the key's expiry to the latest live field's, so that the key
-- vanishes with its last ban. KEYS[1] the user's ban hash; ARGV[1] field (a room, or * for
-- every room), ARGV[2] expiry (unix ms).
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local latest = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local e = tonumber(all[i + 1])
  if e and e > latest then latest = e end
end
redis.call('PEXPIREAT', KEYS[1], latest)
return latest
