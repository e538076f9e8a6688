-- Reads a room's position and the messages a joining or resuming client needs, in one atomic
-- step (docs/protocol.md, "Continuity").
--
-- KEYS[1]  {prefix}{room}:meta   hash: epoch, seq
-- KEYS[2]  {prefix}{room}:hist   stream of entries 0-<offset> with fields t (ms), f (frame)
-- ARGV[1]  the client's epoch ('' = no resume)
-- ARGV[2]  the client's last offset
-- ARGV[3]  most messages a resume may replay
-- ARGV[4]  backlog: the last N messages when there is no complete resume (0 = none)
-- ARGV[5]  history TTL, ms: older entries count as trimmed
-- Returns {epoch ('' = none), offset, status, offset1, frame1, offset2, frame2, ...} with status
-- one of none (no resume asked), complete, epoch, trimmed, too_many.

local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch = meta[1] or ''
local seq = tonumber(meta[2] or '0')
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[5])
local out = {epoch, seq, 'none'}

if ARGV[1] ~= '' then
  local since = tonumber(ARGV[2])
  if epoch == '' or epoch ~= ARGV[1] or since > seq then
    out[3] = 'epoch'
  elseif since == seq then
    out[3] = 'complete'
  elseif seq - since > tonumber(ARGV[3]) then
    out[3] = 'too_many'
  else
    local want = seq - since
    local first = '0-' .. string.format('%d', since + 1)
    local entries = redis.call('XRANGE', KEYS[2], first, '+', 'COUNT', want)
    if #entries == want and entries[1][1] == first and tonumber(entries[1][2][2]) >= oldest then
      out[3] = 'complete'
      for i = 1, #entries do
        out[#out + 1] = since + i
        out[#out + 1] = entries[i][2][4]
      end
      return out
    end
    out[3] = 'trimmed'
  end
  if out[3] == 'complete' then
    return out
  end
end

local backlog = tonumber(ARGV[4])
if backlog > 0 then
  local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', backlog)
  local n = #entries
  while n > 0 and tonumber(entries[n][2][2]) < oldest do
    n = n - 1
  end
  for i = n, 1, -1 do
    out[#out + 1] = tonumber(string.sub(entries[i][1], 3))
    out[#out + 1] = entries[i][2][4]
  end
end
return out
