-- A worker process's beat (workers/runtime/liveness.py), every quarter of its lapse: it is
-- alive, and it does the fleet's share of recovery.
-- 1. Its deadline in the holders zset moves to now + its lapse. The messages it holds (its
--    held hash) stay its own for as long as it beats, however long their calls run.
-- 2. Every process whose deadline passed is dead (killed, hung, cut off): the messages it
--    held go back to the front of their lists, at once. Unless the fleet's Redis itself
--    was away: a process back from failing to reach Redis, or a beat after a silence of
--    two lapses (nobody beat: a Redis restart, a reload from an old snapshot) holds off
--    declaring deaths for one lapse, so live processes beat again first.
-- 3. For each list this process consumes: a message popped whose delivery no process
--    recorded (its worker died between the pop and that record) is one filed in the list's
--    zset scored below the message waiting at the list's popping end (broker_requeue.lua),
--    looked for only when the zset holds more messages than the list. Seen so for a whole
--    lapse, it goes back to the front of its list.
-- No step reads a queue list's contents, so the cost does not grow with a backlog.
-- KEYS: the holders zset, the liveness hash (pulse, calm_until), the message store, the
--   positions hash, the popped hash (tag -> first seen, ms), then the lists consumed.
-- ARGV: this process, its lapse (ms), the lists' zsets' prefix, the held hashes' prefix,
--   '1' when this process's last beat could not reach Redis.
-- Returns {1 if this process was not registered (its first beat, or it lapsed), the
--   messages it holds, messages put back, then dead process, messages, ...}.
--!include broker_requeue
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holders, liveness, messages, positions, popped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local me, lapse, queued_prefix, held_prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local pulse = tonumber(redis.call('HGET', liveness, 'pulse') or '0')
if ARGV[5] == '1' or (pulse > 0 and now - pulse > 2 * lapse) then
  redis.call('HSET', liveness, 'calm_until', now + lapse)
end
redis.call('HSET', liveness, 'pulse', now)
local new = redis.call('ZADD', holders, now + lapse, me)
local holding = redis.call('HLEN', held_prefix .. me)

local restored = 0
local reply = {new, holding, 0}
if now >= tonumber(redis.call('HGET', liveness, 'calm_until') or '0') then
  local dead = redis.call('ZRANGE', holders, '-inf', now, 'BYSCORE', 'LIMIT', 0, 16)
  for _, process in ipairs(dead) do
    local held = held_prefix .. process
    local entries = redis.call('HGETALL', held)
    local back = 0
    for i = 1, #entries, 2 do
      local list = string.match(entries[i + 1], '^%d+ (.*)$')
      back = back + requeue(messages, positions, queued_prefix, list, entries[i], 'front')
    end
    redis.call('DEL', held)
    redis.call('ZREM', holders, process)
    reply[#reply + 1] = process
    reply[#reply + 1] = back
    restored = restored + back
  end
end

-- The delivery tag of a message text: kombu writes it last, in `properties`.
local function tag_of(payload)
  local tag = string.match(string.sub(payload, -1024), '"delivery_tag"%s*:%s*"([^"]+)"')
  if tag then return tag end
  local ok, message = pcall(cjson.decode, payload)
  if ok and type(message) == 'table' and type(message['properties']) == 'table' then
    return message['properties']['delivery_tag']
  end
  return nil
end

for i = 6, #KEYS do
  local list = KEYS[i]
  local queued = queued_prefix .. list
  local missing = redis.call('ZCARD', queued) - redis.call('LLEN', list)
  if missing > 0 then
    local taken = {}
    local waiting = redis.call('LINDEX', list, -1)
    if not waiting then
      taken = redis.call('ZRANGE', queued, 0, missing - 1)
    else
      local tag = tag_of(waiting)
      local at = tag and redis.call('ZSCORE', queued, tag)
      if at then
        taken = redis.call('ZRANGE', queued, '-inf', '(' .. at, 'BYSCORE', 'LIMIT', 0, missing)
      end
    end
    for _, tag in ipairs(taken) do
      local seen = tonumber(redis.call('HGET', popped, tag) or '0')
      if seen == 0 then
        redis.call('HSET', popped, tag, now)
      elseif now - seen >= lapse then
        redis.call('HDEL', popped, tag)
        redis.call('ZREM', queued, tag)
        restored = restored + requeue(messages, positions, queued_prefix, list, tag, 'front')
      end
    end
  end
end
reply[3] = restored
return reply
