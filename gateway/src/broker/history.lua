-- Reads a room's position and the messages a joining or resuming client needs, in one atomic
-- step (docs/protocol.md, "Continuity"), never more than a byte budget of them: the read stops
-- adding entries at the budget, in batches, so a huge history never leaves Redis in one reply.
--
-- KEYS[1]  {prefix}{room}:meta   hash: epoch, seq, bytes
-- KEYS[2]  {prefix}{room}:hist   stream of entries 0-<offset> with fields t (ms), f (frame)
-- ARGV[1]  the client's epoch ('' = no resume)
-- ARGV[2]  the client's last offset
-- ARGV[3]  most messages a resume may replay
-- ARGV[4]  backlog: the last N messages when there is no complete resume (0 = none)
-- ARGV[5]  history TTL, ms: older entries count as trimmed
-- ARGV[6]  most frame bytes the read returns
-- ARGV[7]  1: a resume over the byte budget returns the oldest missed entries that fit (at
--          least one, so that paging always advances), as a complete but truncated page (the
--          HTTP API); 0: it is too_many (a joining client)
-- ARGV[8]  meta TTL, ms: a room without a sequence gets its epoch here, as on its first publish
-- Returns {epoch, offset, status, truncated (0|1), offset1, frame1, offset2, ...}
-- with status one of none (no resume asked), complete, epoch, trimmed, too_many.

local BATCH = 64
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch = meta[1] or ''
local seq = tonumber(meta[2] or '0')
local t = redis.call('TIME')
if epoch == '' then
  -- A room without a sequence (never published, or its meta expired) begins one now, exactly as
  -- publish.lua would: a member who joins before the first message gets a position (epoch, 0)
  -- to resume from, and a message published while it is away reaches it from history.
  local n = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  while n > 0 do
    local d = n % 36
    epoch = string.sub(digits, d + 1, d + 1) .. epoch
    n = math.floor(n / 36)
  end
  seq = 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'bytes', 0, 'seq', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
end
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local partial = ARGV[7] == '1'
local out = {epoch, seq, 'none', 0}

if ARGV[1] ~= '' then
  local since = tonumber(ARGV[2])
  if epoch == '' or epoch ~= ARGV[1] or since > seq then
    out[3] = 'epoch'
  elseif since == seq then
    out[3] = 'complete'
    return out
  elseif seq - since > tonumber(ARGV[3]) then
    out[3] = 'too_many'
  else
    local want = seq - since
    local got, used, over = 0, 0, false
    local first = '0-' .. string.format('%d', since + 1)
    local from = first
    while got < want and not over do
      local entries = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', math.min(BATCH, want - got))
      if #entries == 0 then
        break
      end
      if got == 0 and (entries[1][1] ~= first or tonumber(entries[1][2][2]) < oldest) then
        break
      end
      for i = 1, #entries do
        local f = entries[i][2][4]
        if used + #f > budget and not (partial and got == 0) then
          over = true
          break
        end
        used = used + #f
        got = got + 1
        out[#out + 1] = since + got
        out[#out + 1] = f
      end
      from = '0-' .. string.format('%d', since + got + 1)
    end
    if over and partial then
      out[3] = 'complete'
      out[4] = 1
      return out
    elseif over then
      out[3] = 'too_many'
      out[4] = 1
    elseif got == want then
      out[3] = 'complete'
      return out
    else
      out[3] = 'trimmed'
    end
    for i = #out, 5, -1 do
      out[i] = nil
    end
  end
end

local backlog = tonumber(ARGV[4])
if backlog > 0 then
  -- Newest first, until the count, the age limit or the byte budget stops it.
  local picked, used = {}, 0
  local to = '+'
  while #picked < backlog do
    local entries = redis.call('XREVRANGE', KEYS[2], to, '-', 'COUNT', math.min(BATCH, backlog - #picked))
    if #entries == 0 then
      break
    end
    local stop = false
    for i = 1, #entries do
      local e = entries[i]
      if tonumber(e[2][2]) < oldest then
        stop = true
        break
      end
      if used + #e[2][4] > budget then
        out[4] = 1
        stop = true
        break
      end
      used = used + #e[2][4]
      picked[#picked + 1] = e
    end
    local last = tonumber(string.sub(entries[#entries][1], 3))
    if stop or last <= 1 then
      break
    end
    to = '0-' .. string.format('%d', last - 1)
  end
  for i = #picked, 1, -1 do
    out[#out + 1] = tonumber(string.sub(picked[i][1], 3))
    out[#out + 1] = picked[i][2][4]
  end
end
return out
