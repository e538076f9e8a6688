-- Removes one delivered (or dead-lettered) event from a room's stream, if this node instance
-- still holds the room's lease, and renews the lease.
-- KEYS[1] the room's event stream, KEYS[2] its lease, KEYS[3] its delivery state, KEYS[4] its
-- dead-letter stream.
-- ARGV[1] this instance's id, ARGV[2] the entry id, ARGV[3] the lease's lifetime (ms),
-- ARGV[4] '' (delivered) or why it is dead-lettered, ARGV[5] the dead-letter stream's MAXLEN.
-- Answer: 1 done, 0 the lease is not ours (another instance delivers the room now).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
if ARGV[4] ~= '' then
  local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
  if #entry > 0 then
    local fields, event = entry[1][2], ''
    for i = 1, #fields, 2 do
      if fields[i] == 'e' then event = fields[i + 1] end
    end
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*',
      'e', event, 'id', ARGV[2], 'reason', ARGV[4])
  end
end
local removed = redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'done', removed)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
