-- Appends the events of one or more streams and enforces retention, in one
-- atomic call. KEYS: log, idx, meta of each stream (one stream's three keys
-- share a hash slot). ARGV: max events, max bytes, TTL in ms (0: none), then
-- per stream, in KEYS order: its number of events k, then k times
-- `seq, id, raw, stored_at_ms`. Events at or below a stream's last sequence
-- are skipped (a retried batch adds nothing). Sequence numbers are kept as
-- the decimal strings the client sent.
--
-- meta holds `last_seq`, `bytes`, `n` (the log's length) and `ttl_at` (when
-- the TTL is next refreshed: the three keys' TTL is refreshed once it has run
-- down by 1/64, not on every call), so that an append reads one hash and
-- writes it back: fewer commands per stream. A log lost without its meta
-- (evicted; expired while a cursor write kept the meta) is noticed by
-- `XADD NOMKSTREAM`, and counted from zero again.
local max_events, max_bytes, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- unpack() takes a bounded number of values: long argument lists go in slices.
local STEP = 1000

local function call_sliced(cmd, key, list)
  for i = 1, #list, STEP do
    redis.call(cmd, key, unpack(list, i, math.min(i + STEP - 1, #list)))
  end
end

local now = 0
if ttl > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local a = 4
for s = 1, #KEYS, 3 do
  local log, idx, meta = KEYS[s], KEYS[s + 1], KEYS[s + 2]
  local first = a + 1
  local stop = a + 4 * tonumber(ARGV[a])
  a = stop + 1
  local m = redis.call('HMGET', meta, 'last_seq', 'bytes', 'n', 'ttl_at')
  local last_s = m[1] or '0'
  local last = tonumber(last_s)
  -- A meta written before `n` was kept, or none: count the log.
  local n = tonumber(m[3] or '') or redis.call('XLEN', log)
  local bytes = n > 0 and tonumber(m[2] or '0') or 0
  local created = false
  local fresh = {}
  for i = first, stop, 4 do
    local seq = tonumber(ARGV[i])
    if seq > last then
      local id = ARGV[i] .. '-0'
      if n == 0 or not redis.call('XADD', log, 'NOMKSTREAM', id, 'id', ARGV[i + 1], 'raw', ARGV[i + 2], 't', ARGV[i + 3]) then
        -- No log (yet, or any more): it starts here, from zero.
        if n > 0 then n, bytes = 0, 0 end
        redis.call('XADD', log, id, 'id', ARGV[i + 1], 'raw', ARGV[i + 2], 't', ARGV[i + 3])
        created = true
      end
      fresh[#fresh + 1] = ARGV[i + 1]
      fresh[#fresh + 1] = ARGV[i]
      bytes = bytes + #ARGV[i + 2]
      n = n + 1
      last, last_s = seq, ARGV[i]
    end
  end
  if #fresh > 0 then
    -- Event ID -> seq; a later event with the same ID takes the entry over.
    call_sliced('HSET', idx, fresh)
    -- Trim the oldest entries past the bounds (the newest one always stays),
    -- read a slice at a time, deleted together.
    if n > 1 and (n > max_events or bytes > max_bytes) then
      local gone, ids, seqs = {}, {}, {}
      local from = '-'
      while n > 1 and (n > max_events or bytes > max_bytes) do
        local want = math.min(math.max(n - max_events, 1), n - 1, STEP)
        local oldest = redis.call('XRANGE', log, from, '+', 'COUNT', want)
        if #oldest == 0 then break end
        for _, e in ipairs(oldest) do
          if not (n > 1 and (n > max_events or bytes > max_bytes)) then break end
          local f = e[2]
          local oid, oraw = nil, ''
          for j = 1, #f, 2 do
            if f[j] == 'id' then oid = f[j + 1] elseif f[j] == 'raw' then oraw = f[j + 1] end
          end
          gone[#gone + 1] = e[1]
          if oid then
            ids[#ids + 1] = oid
            seqs[#seqs + 1] = string.match(e[1], '^(%d+)')
          end
          bytes = bytes - #oraw
          n = n - 1
        end
        from = '(' .. oldest[#oldest][1]
      end
      call_sliced('XDEL', log, gone)
      -- Forget an ID only if it still points at the trimmed entry.
      local stale = {}
      for i = 1, #ids, STEP do
        local j = math.min(i + STEP - 1, #ids)
        local cur = redis.call('HMGET', idx, unpack(ids, i, j))
        for x = i, j do
          if cur[x - i + 1] == seqs[x] then stale[#stale + 1] = ids[x] end
        end
      end
      call_sliced('HDEL', idx, stale)
    end
    local ttl_at = tonumber(m[4] or '0')
    local refresh = ttl > 0 and (created or now >= ttl_at)
    if refresh then ttl_at = now + math.floor(ttl / 64) end
    redis.call('HSET', meta, 'last_seq', last_s, 'bytes', bytes, 'n', n, 'ttl_at', ttl_at)
    if refresh then
      redis.call('PEXPIRE', log, ttl)
      redis.call('PEXPIRE', idx, ttl)
      redis.call('PEXPIRE', meta, ttl)
    end
  end
end
return 0
