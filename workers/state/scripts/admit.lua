-- Whether a model may take one call now, and (unless a dry run) its slot: one round trip.
-- KEYS: cooldown, circuit open, probe, then n_caps spend counters, then the limit windows.
-- ARGV: member, dry ('1' = only look), probe ttl ms, n_caps, one cap (USD) per spend
--   counter, then per window: limit, window ms, amount, kind ('req' counts members, 'tok'
--   sums the amount after '|' in each member).
-- Returns {1, now, probe} when admitted (probe 1: this call is the half-open circuit's one
-- probe), else {0, now, until ms (-1: a budget, whose end the caller knows), why, index}
-- with why one of 'cooldown' (index: the raw cooldown value), 'half-open', 'budget',
-- 'window' (index: 1-based, of the full spend counter or window; a budget adds what was
-- spent).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, dry, probe_ttl = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local n_caps = tonumber(ARGV[4])

local cooling = redis.call('GET', KEYS[1])
if cooling then
  return {0, now, tonumber(string.match(cooling, '^(%d+)')) or now, 'cooldown', cooling}
end
local half_open = redis.call('EXISTS', KEYS[2]) == 1
if half_open and redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, now, now + 1000, 'half-open', 0}
end
for i = 1, n_caps do
  local spent = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  if spent >= tonumber(ARGV[4 + i]) then return {0, now, -1, 'budget', i, tostring(spent)} end
end

local first_window, first_arg = 4 + n_caps, 5 + n_caps
local worst, worst_i = nil, 0
for i = first_window, #KEYS do
  local key, base = KEYS[i], first_arg + (i - first_window) * 4
  local limit, win = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
  local amount, kind = tonumber(ARGV[base + 2]), ARGV[base + 3]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local used, sizes = 0, {}
  for j = 1, #entries, 2 do
    local size = 1
    if kind == 'tok' then size = tonumber(string.match(entries[j], '|(%d+)$')) or 0 end
    used = used + size
    sizes[#sizes + 1] = {size, tonumber(entries[j + 1])}
  end
  local full = (used + amount > limit and used > 0) or (amount == 0 and used >= limit)
  if full then
    local until_ms, freed = now + win, 0
    for _, e in ipairs(sizes) do
      freed = freed + e[1]
      if used - freed + amount <= limit and (amount > 0 or used - freed < limit) then
        until_ms = e[2] + win
        break
      end
    end
    if worst == nil or until_ms > worst then worst, worst_i = until_ms, i - first_window + 1 end
  end
end
if worst ~= nil then return {0, now, worst, 'window', worst_i} end
if dry then return {1, now, 0} end

for i = first_window, #KEYS do
  local key, base = KEYS[i], first_arg + (i - first_window) * 4
  local amount, kind = tonumber(ARGV[base + 2]), ARGV[base + 3]
  if amount > 0 then
    local m = member
    if kind == 'tok' then m = member .. '|' .. amount end
    redis.call('ZADD', key, now, m)
    redis.call('PEXPIRE', key, tonumber(ARGV[base + 1]))
  end
end
if half_open then
  redis.call('SET', KEYS[3], member, 'PX', probe_ttl)
  return {1, now, 1}
end
return {1, now, 0}
