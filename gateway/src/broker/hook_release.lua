-- Releases this node instance's lease on a room's webhooks — but not while the stream holds
-- undelivered events (unless ARGV[2] is '1', at shutdown), so that an event appended by another
-- node while this one was finishing is never left without a deliverer.
-- KEYS[1] the room's event stream, KEYS[2] its lease, KEYS[3] its delivery state.
-- ARGV[1] this instance's id, ARGV[2] '1' to release even with events left.
-- Answer: 1 released, 0 kept (events left: deliver them), -1 the lease was not ours.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local len = redis.call('XLEN', KEYS[1])
if len > 0 and ARGV[2] ~= '1' then
  return 0
end
redis.call('DEL', KEYS[2])
if len == 0 then
  -- Nothing left: the stream and its counts go (a later event starts both afresh).
  redis.call('DEL', KEYS[1], KEYS[3])
end
return 1
