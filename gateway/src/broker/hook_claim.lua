-- Takes or renews this node's lease on a room's webhooks and reads the oldest undelivered
-- events (webhooks, docs/protocol.md): the stream holds only undelivered events, oldest first.
-- KEYS[1] the room's event stream, KEYS[2] its lease, KEYS[3] its delivery state (hash: `done`
-- events delivered, `dropped` events counted as trimmed by the stream's MAXLEN).
-- ARGV[1] this node instance's id, ARGV[2] the lease's lifetime (ms), ARGV[3] most events to read
-- (0: renew only).
-- Answer: {0} held by another instance; else {1, dropped now, id1, event1, id2, event2, ...}.
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {0}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local count = tonumber(ARGV[3])
local out = {1, 0}
if count == 0 or redis.call('EXISTS', KEYS[1]) == 0 then
  return out
end
-- Appended, minus delivered, minus still in the stream, minus already counted: trimmed unsent.
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local added, len = 0, 0
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then added = tonumber(info[i + 1]) end
  if info[i] == 'length' then len = tonumber(info[i + 1]) end
end
local done = tonumber(redis.call('HGET', KEYS[3], 'done') or '0')
local counted = tonumber(redis.call('HGET', KEYS[3], 'dropped') or '0')
local dropped = added - done - len - counted
if dropped > 0 then
  redis.call('HINCRBY', KEYS[3], 'dropped', dropped)
  out[2] = dropped
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', count)) do
  local fields, event = entry[2], ''
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then event = fields[i + 1] end
  end
  out[#out + 1] = entry[1]
  out[#out + 1] = event
end
return out
