-- Reads one page of a room's member list (the `members` command and the rooms API), without
-- changing anything. KEYS[1] the room's listed members (member key -> member JSON), KEYS[2] the
-- roster's epoch and version (hash: e, v), KEYS[3] the over-the-bound flag; ARGV[1] the HSCAN cursor ('0' from the
-- start), ARGV[2] the page size (HSCAN's COUNT hint: a page may hold a few more or fewer).
-- Returns {version, over (0/1), next cursor ('0': done), member JSON...}; a room over the bound
-- lists nobody.
local version = tonumber(redis.call('HGET', KEYS[2], 'v') or '0')
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {version, 1, '0'}
end
local page = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local answer = {version, 0, page[1]}
for i = 2, #page[2], 2 do
  answer[#answer + 1] = page[2][i]
end
return answer
