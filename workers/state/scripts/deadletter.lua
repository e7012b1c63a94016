-- Dead letters, bounded. The hash holds every letter (job id -> JSON); an index per task
-- class (sorted set: job id -> filed at, on Redis' clock) finds a class's oldest without
-- reading the hash; `trimmed` counts, per class, the letters retention took out, and
-- '<class>:at' says when it last did. A fragment, included by store_result.lua (filing
-- a letter trims its class, in the same step) and trim_dead_letters.lua.
local TRIM_BATCH = 500  -- removed per call at most: a script holds Redis while it runs

local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function drop_letters(hash, index, ids)
  if #ids == 0 then return 0 end
  redis.call('HDEL', hash, unpack(ids))
  redis.call('ZREM', index, unpack(ids))
  return #ids
end

-- One class's letters older than max_age_s, then its oldest beyond max_count, go.
local function trim_dead_letters(hash, index, trimmed, bucket, max_count, max_age_s, now)
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. (now - max_age_s),
    'LIMIT', 0, TRIM_BATCH)
  local gone = drop_letters(hash, index, old)
  local excess = redis.call('ZCARD', index) - max_count
  if excess > 0 then
    gone = gone + drop_letters(hash, index,
      redis.call('ZRANGE', index, 0, math.min(excess, TRIM_BATCH) - 1))
  end
  if gone > 0 then
    redis.call('HINCRBY', trimmed, bucket, gone)
    redis.call('HSET', trimmed, bucket .. ':at', tostring(now))
  end
  return gone
end

local function file_dead_letter(hash, index, trimmed, id, letter, bucket, max_count, max_age_s)
  local now = now_s()
  redis.call('HSET', hash, id, letter)
  redis.call('ZADD', index, now, id)
  return trim_dead_letters(hash, index, trimmed, bucket, max_count, max_age_s, now)
end
