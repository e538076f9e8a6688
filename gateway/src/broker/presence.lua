-- One node instance's tick for one room, in one atomic step in the room's slot: its counts, its
-- listed members (rooms that list) and the room's lifecycle events; returns the room's
-- cluster-wide counts and the list's changes since the version the node saw last.
-- The reaper runs it too, for an instance that died (ARGV[13] = '1').
--
-- KEYS[1] the room's presence hash (instance -> "hosts viewers expires_at_ms");
-- KEYS[2] the instance's roster hash (member key -> connections on that instance);
-- KEYS[3] the room's totals (member key -> connections cluster-wide);
-- KEYS[4] the room's listed members (member key -> {"sub","name","role"} JSON);
-- KEYS[5] the roster's epoch and version (hash: e, v); KEYS[6] the change log (a list of batch JSONs, the last ARGV[11]);
-- KEYS[7] the over-the-bound flag; KEYS[8] the room's lifecycle event stream.
-- ARGV[1] instance, ARGV[2] hosts, ARGV[3] viewers (negative: withdraw), ARGV[4] counts' time to
-- live (ms), ARGV[5] '1' to append lifecycle events, ARGV[6] room, ARGV[7] '1' if the room lists,
-- ARGV[8] epoch:version seen last ('' none), ARGV[9] --list-max-members, ARGV[10] hysteresis percent,
-- ARGV[11] log length, ARGV[12] the roster keys' lifetime (ms), ARGV[13] '1' to reap the instance,
-- then per changed member: key, connections on this instance now, member JSON, close reason.
--
-- Expiry uses Redis' own clock (TIME), so nodes' clocks do not matter; counts of instances that
-- stopped reporting are ignored and deleted once expired, and the whole key expires when no node
-- reports any more.
--
-- Returns {hosts, viewers, version, over (0/1), reset (0/1), events appended, epoch (0 for a
-- room that does not list), batch JSON...}. The epoch is made (from TIME) when a roster begins,
-- so a node that remembers a lost roster's version is told `reset`, never a wrong "no change".
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl = ARGV[1], tonumber(ARGV[4])
local events_on, room = ARGV[5] == '1', ARGV[6]
local reap = ARGV[13] == '1'
local appended = 0
local function event(e)
  if events_on then
    e.room = room
    e.ts_ms = now
    redis.call('XADD', KEYS[8], 'MAXLEN', '~', 10000, '*', 'e', cjson.encode(e))
    appended = appended + 1
  end
end
-- For the lifecycle events the room is occupied while any instance has a field in its hash (one
-- with zero counts included: a node keeps its field for --unsubscribe-delay after its last member
-- left, the vacated event's debounce), expired ones included until a script removes them (below,
-- or the reaper's run): vacated when the last field goes, occupied when the first comes. Counting
-- only live fields here made a member joining another node between a dead node's expiry and its
-- reaping send a second `room.occupied` with no `room.vacated` between.
local function fields()
  local n = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.match(all[i + 1], '^%d+ %d+ %d+$') then
      n = n + 1
    end
  end
  return n
end
local before = fields()
if tonumber(ARGV[2]) >= 0 and not reap then
  redis.call('HSET', KEYS[1], me, ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (now + ttl))
  -- Twice the fields' lifetime: a dead instance's expired field stays for its reaper to see.
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
else
  redis.call('HDEL', KEYS[1], me)
end
local hosts, viewers, after = 0, 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local h, v, exp = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if exp and tonumber(exp) > now then
    hosts = hosts + tonumber(h)
    viewers = viewers + tonumber(v)
    after = after + 1
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if before == 0 and after > 0 then
  event({type = 'room.occupied'})
end

local version, over, reset, epoch = 0, 0, 0, '0'
local out = {}
if ARGV[7] == '1' then
  local max, pct, cap, keep = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
  local changes = {}
  if reap then
    local mine = redis.call('HGETALL', KEYS[2])
    for i = 1, #mine, 2 do
      local info = redis.call('HGET', KEYS[4], mine[i]) or cjson.encode({sub = mine[i], role = 'viewer'})
      changes[#changes + 1] = {mine[i], 0, info, 'node_lost'}
    end
  else
    for i = 14, #ARGV, 4 do
      changes[#changes + 1] = {ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]}
    end
  end
  local joined, left = {}, {}
  for _, c in ipairs(changes) do
    local sub, count, info, reason = c[1], c[2], c[3], c[4]
    local old = tonumber(redis.call('HGET', KEYS[2], sub) or '0')
    if count > 0 then
      redis.call('HSET', KEYS[2], sub, count)
    else
      redis.call('HDEL', KEYS[2], sub)
    end
    if count ~= old then
      local now_total = redis.call('HINCRBY', KEYS[3], sub, count - old)
      local was = now_total - (count - old)
      if now_total <= 0 then
        redis.call('HDEL', KEYS[3], sub)
      end
      if was <= 0 and now_total > 0 then
        redis.call('HSET', KEYS[4], sub, info)
        joined[#joined + 1] = cjson.decode(info)
      elseif was > 0 and now_total <= 0 then
        local m = cjson.decode(redis.call('HGET', KEYS[4], sub) or info)
        redis.call('HDEL', KEYS[4], sub)
        left[#left + 1] = {sub = sub, reason = reason}
        m.type = 'member.left'
        m.reason = reason
        left[#left].event = m
      end
    end
  end
  if reap then
    redis.call('DEL', KEYS[2])
  end
  epoch = redis.call('HGET', KEYS[5], 'e')
  if not epoch then
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('HSET', KEYS[5], 'e', epoch, 'v', 0)
  end
  version = tonumber(redis.call('HGET', KEYS[5], 'v'))
  local n = redis.call('HLEN', KEYS[3])
  local was_over = redis.call('EXISTS', KEYS[7]) == 1
  local batch = nil
  if not was_over and n > max then
    redis.call('SET', KEYS[7], '1')
    batch = {over_limit = true}
    over = 1
  elseif was_over and n <= math.floor(max * pct / 100) then
    redis.call('DEL', KEYS[7])
    batch = {reset = true}
  elseif was_over then
    over = 1
  elseif #joined > 0 or #left > 0 then
    batch = {}
    if #joined > 0 then batch.joined = joined end
    if #left > 0 then
      local l = {}
      for i, x in ipairs(left) do l[i] = {sub = x.sub, reason = x.reason} end
      batch.left = l
    end
  end
  if over == 0 then
    for _, m in ipairs(joined) do
      local e = {type = 'member.joined', sub = m.sub, name = m.name, role = m.role}
      event(e)
    end
    for _, x in ipairs(left) do
      event(x.event)
    end
  end
  if batch then
    version = redis.call('HINCRBY', KEYS[5], 'v', 1)
    batch.v = version
    redis.call('RPUSH', KEYS[6], cjson.encode(batch))
    redis.call('LTRIM', KEYS[6], -cap, -1)
  end
  for k = 2, 7 do
    if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('PEXPIRE', KEYS[k], keep) end
  end
  if ARGV[8] ~= '' then
    local seen_epoch, seen = string.match(ARGV[8], '^(%d+):(%d+)$')
    seen = tonumber(seen)
    local behind = version - seen
    if seen_epoch ~= epoch or seen > version or behind > redis.call('LLEN', KEYS[6]) then
      reset = 1
    elseif behind > 0 then
      out = redis.call('LRANGE', KEYS[6], -behind, -1)
    end
  end
end

if before > 0 and after == 0 then
  event({type = 'room.vacated'})
end
local answer = {hosts, viewers, version, over, reset, appended, epoch}
for _, b in ipairs(out) do
  answer[#answer + 1] = b
end
return answer
