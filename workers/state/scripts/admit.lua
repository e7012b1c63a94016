-- admit(K, A, now): whether a model may take one call now, and (unless a dry run)
-- its slot. Run alone (FleetState.admit, limits.py), KEYS and ARGV are its K and A and
-- now is Redis' clock; begin.lua includes the function (up to `--!main`: connections.py)
-- to admit a delivery's first call in its first round trip.
-- K: cooldown, circuit open, probe, then n_caps spend counters, then the limit windows.
-- A: member, dry ('1' = only look), probe ttl ms, n_caps, one cap (USD) per spend
--   counter, then per window: limit, window ms, amount, kind ('req'
--   counts members, 'tok' sums the amount after '|' in each member). The window ms is
--   the limit's window plus the fleet's margin (limits.py): an entry leaves the count
--   only that long after its slot was taken, so calls that reach the provider later than
--   others still fit its window on its own clock.
-- Returns {1, now, probe} when admitted (probe 1: this call is the half-open circuit's one
-- probe), else {0, now, until ms (-1: a budget, whose end the caller knows), why, index}
-- with why one of 'cooldown' (index: the raw cooldown value), 'half-open', 'budget',
-- 'window' (index: 1-based, of the full spend counter or window; a budget adds what was
-- spent).
local function admit(K, A, now)
  local member, dry, probe_ttl = A[1], A[2] == '1', tonumber(A[3])
  local n_caps = tonumber(A[4])
  local first_cap = 4  -- K's index of the first spend counter

  local cooling = redis.call('GET', K[1])
  if cooling then
    return {0, now, tonumber(string.match(cooling, '^(%d+)')) or now, 'cooldown', cooling}
  end
  local half_open = redis.call('EXISTS', K[2]) == 1
  if half_open and redis.call('EXISTS', K[3]) == 1 then
    return {0, now, now + 1000, 'half-open', 0}
  end
  for i = 1, n_caps do
    local spent = tonumber(redis.call('GET', K[first_cap - 1 + i]) or '0')
    if spent >= tonumber(A[4 + i]) then return {0, now, -1, 'budget', i, tostring(spent)} end
  end

  local first_window, first_arg = first_cap + n_caps, 5 + n_caps

  -- When a full window frees enough room for this call: the arrival (ms) of the oldest
  -- entry that must leave first, plus the window. Request windows count their entries
  -- (ZCARD: no scan, however busy the window); token windows sum the sizes recorded after
  -- '|' in each member.
  local function request_window(key, limit, win, amount)
    local used = redis.call('ZCARD', key)
    local full = (used + amount > limit and used > 0) or (amount == 0 and used >= limit)
    if not full then return nil end
    local leave = used + amount - limit
    if amount == 0 then leave = used - limit + 1 end
    local entry = redis.call('ZRANGE', key, leave - 1, leave - 1, 'WITHSCORES')
    if #entry == 0 then return now + win end
    return tonumber(entry[2]) + win
  end

  local function token_window(key, limit, win, amount)
    local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    local used, sizes = 0, {}
    for j = 1, #entries, 2 do
      local size = tonumber(string.match(entries[j], '|(%d+)$')) or 0
      used = used + size
      sizes[#sizes + 1] = {size, tonumber(entries[j + 1])}
    end
    local full = (used + amount > limit and used > 0) or (amount == 0 and used >= limit)
    if not full then return nil end
    local freed = 0
    for _, e in ipairs(sizes) do
      freed = freed + e[1]
      if used - freed + amount <= limit and (amount > 0 or used - freed < limit) then
        return e[2] + win
      end
    end
    return now + win
  end

  local worst, worst_i = nil, 0
  for i = first_window, #K do
    local key, base = K[i], first_arg + (i - first_window) * 4
    local limit, win = tonumber(A[base]), tonumber(A[base + 1])
    local amount, kind = tonumber(A[base + 2]), A[base + 3]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
    local until_ms
    if kind == 'tok' then
      until_ms = token_window(key, limit, win, amount)
    else
      until_ms = request_window(key, limit, win, amount)
    end
    if until_ms ~= nil and (worst == nil or until_ms > worst) then
      worst, worst_i = until_ms, i - first_window + 1
    end
  end
  if worst ~= nil then return {0, now, worst, 'window', worst_i} end
  if dry then return {1, now, 0} end

  for i = first_window, #K do
    local key, base = K[i], first_arg + (i - first_window) * 4
    local amount, kind = tonumber(A[base + 2]), A[base + 3]
    if amount > 0 then
      local m = member
      if kind == 'tok' then m = member .. '|' .. amount end
      redis.call('ZADD', key, now, m)
      redis.call('PEXPIRE', key, tonumber(A[base + 1]))
    end
  end
  if half_open then
    redis.call('SET', K[3], member, 'PX', probe_ttl)
    return {1, now, 1}
  end
  return {1, now, 0}
end
--!main
local t = redis.call('TIME')
return admit(KEYS, ARGV, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
