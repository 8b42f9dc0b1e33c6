-- Appends the events of one or more streams and enforces retention, in one
-- atomic call. KEYS: log, idx of each stream (one stream's keys share a hash
-- slot). ARGV: max events, max bytes, TTL in ms (0: none), then per stream,
-- in KEYS order: its number of events k, then k times
-- `seq, id, raw, entry` (entry: the log entry's ID, `seq-stored_at_ms`; the
-- entry's one field is the event's ID, with the raw bytes as its value: a
-- trim reads two strings per entry, a resume compares the field). Events at or below a stream's last
-- sequence are skipped (a retried batch adds nothing).
--
-- idx holds the stream's meta and cursor, under field names that start with
-- NUL: `\0m` is the meta: a format byte 2, then `bytes n ttl_at` as
-- little-endian doubles (the log's bytes and length; when the keys' TTL is
-- next refreshed, in ms, once it has run down by 1/64, not on every call),
-- then the last sequence in decimal (binary, as parsing and formatting text
-- took a fifth of the script's time); `\0c` is the cursor, `\0e` the end.
-- There is no index of event IDs: a resume finds its ID by reading the log
-- from its newest entry back (the find script), which is rare, while an
-- index costs every append a field in a large hash and every trim a
-- deletion per entry. So an append is HGET, XADD, HSET per stream, the hash
-- small; at the cap also an XRANGE of the oldest entries (their sizes), the
-- log being trimmed by the XADD itself (MINID).
--
-- Trimming walks the entries Redis has marked deleted at the head of the
-- log (up to a node's worth), so a large log is trimmed in slices: once it
-- passes a bound, it goes down to 1% below it (at most 100 events; for
-- bounds of 1,000 events or 1 MiB and more), and the next appends trim
-- nothing. A log never holds more than the bounds.
--
-- A log lost while its idx stays (evicted; expired while cursor writes kept
-- the idx) is noticed (XADD NOMKSTREAM, or no oldest entries to read) and
-- the stream starts from zero again (its cursor and end kept); an idx lost
-- while its log stays (evicted) drops the log too. Sequence numbers are compared
-- as the decimal strings the client sent; counts and sums are doubles, exact
-- below 2^53. The work table is reused across streams: a call allocates little.
local max_events, max_bytes, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- The most entries a trim reads at once.
local STEP = 1000
local M = '\0m'

-- a > b for canonical decimal strings.
local function gt(a, b)
  local la, lb = #a, #b
  if la ~= lb then return la > lb end
  return a > b
end

local now = 0
if ttl > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local pack, unpack_meta = struct.pack, struct.unpack

-- The meta field's value (see the header).
local function meta_of(last, bytes, n, ttl_at)
  return '\2' .. pack('<ddd', bytes, n, ttl_at) .. last
end
local refresh_every = math.floor(ttl / 64)
-- Where a trim leaves a log: 1% below the bounds, for large bounds.
local low_events, low_bytes = max_events, max_bytes
if max_events >= 1000 then low_events = max_events - math.min(100, math.floor(max_events / 100)) end
if max_bytes >= 1048576 then low_bytes = max_bytes - math.floor(max_bytes / 100) end

-- Reused per stream: new events' argument indexes.
local fresh = {}

local a = 4
for s = 1, #KEYS, 2 do
  local log, idx = KEYS[s], KEYS[s + 1]
  local first = a + 1
  local k = ARGV[a]
  local stop = a + 4 * (k == '1' and 1 or tonumber(k))
  a = stop + 1
  local meta = redis.call('HGET', idx, M)
  local last, bytes, n, ttl_at = '0', 0, 0, 0
  if meta then
    if #meta > 25 and string.byte(meta, 1) == 2 then
      bytes, n, ttl_at = unpack_meta('<ddd', meta, 2)
      last = string.sub(meta, 26)
    else
      -- Unreadable: as if missing (the stream starts over).
      meta = nil
    end
  end
  -- The new events: those past the last sequence.
  local nf, added = 0, 0
  for i = first, stop, 4 do
    if gt(ARGV[i], last) then
      nf = nf + 1
      fresh[nf] = i
      added = added + #ARGV[i + 2]
      last = ARGV[i]
    end
  end
  if nf > 0 then
    -- Whether the log was lost, whether it was created.
    local wiped, created = false, false
    if not meta then
      -- A new stream, or one whose idx is gone: a log without it starts over.
      redis.call('DEL', log)
    end
    -- Trim plan: the oldest entries past the bounds (the newest one always
    -- stays), read a slice at a time; then the oldest new events.
    local total, sum = n + nf, bytes + added
    local minid = nil
    local kept, old = 1, n
    local from = '-'
    -- Past a bound: trim to the low marks.
    local cap_n, cap_b = max_events, max_bytes
    if total > max_events or sum > max_bytes then cap_n, cap_b = low_events, low_bytes end
    while total > 1 and (total > cap_n or sum > cap_b) and old > 0 do
      local want = math.min(math.max(total - cap_n, 1), old, STEP)
      local oldest = redis.call('XRANGE', log, from, '+', 'COUNT', want)
      if #oldest == 0 then
        if minid then break end
        -- The log is gone: it starts again with this call's events.
        wiped = true
        total, sum, old, n = nf, added, 0, 0
      else
        for _, e in ipairs(oldest) do
          if not (total > 1 and (total > cap_n or sum > cap_b)) then break end
          -- One field: the event's ID, its raw bytes.
          local oraw = e[2][2] or ''
          minid = e[1]
          sum = sum - #oraw
          total, old, n = total - 1, old - 1, n - 1
        end
        from = '(' .. oldest[#oldest][1]
      end
    end
    while total > 1 and (total > cap_n or sum > cap_b) do
      sum = sum - #ARGV[fresh[kept] + 2]
      total = total - 1
      kept = kept + 1
    end
    if minid then
      -- The last XADD trims every entry up to the last trimmed one: those of
      -- its sequence and before (the entry ID's second part is a time).
      minid = string.format('%d', tonumber(string.match(minid, '^(%d+)')) + 1)
    end
    -- Append the kept new events.
    for x = kept, nf do
      local i = fresh[x]
      local r
      if n > 0 and not wiped then
        if x == nf and minid then
          r = redis.call('XADD', log, 'NOMKSTREAM', 'MINID', '=', minid, ARGV[i + 3], ARGV[i + 1], ARGV[i + 2])
        else
          r = redis.call('XADD', log, 'NOMKSTREAM', ARGV[i + 3], ARGV[i + 1], ARGV[i + 2])
        end
        if not r then
          -- The log is gone (no trim was planned: its read would have seen
          -- that): it starts again with this call's kept events.
          wiped, n = true, 0
          sum = 0
          for y = kept, nf do sum = sum + #ARGV[fresh[y] + 2] end
          for y = kept, x - 1 do
            local iy = fresh[y]
            redis.call('XADD', log, ARGV[iy + 3], ARGV[iy + 1], ARGV[iy + 2])
            n = n + 1
          end
        end
      end
      if not r then
        redis.call('XADD', log, ARGV[i + 3], ARGV[i + 1], ARGV[i + 2])
        created = true
      end
      n = n + 1
    end
    if ttl > 0 and (created or ttl_at <= now) then
      ttl_at = now + refresh_every
    else
      created = false
    end
    redis.call('HSET', idx, M, meta_of(last, sum, n, ttl_at))
    if created then
      -- Also when the TTL ran down by 1/64.
      redis.call('PEXPIRE', log, ttl)
      redis.call('PEXPIRE', idx, ttl)
    end
  end
end
return 0
