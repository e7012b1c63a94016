-- settle(marker, day, month, delta): move an app's spend counters by `delta` (the job's
-- real cost minus what was reserved for it), once per job: the marker key, set here,
-- makes every later settlement of the same job a no-op. A fragment, included by
-- store_result.lua (a job's final state) and refund.lua (a job that never ran).
local function settle(marker, day, month, delta)
  if redis.call('SET', marker, '1', 'NX', 'EX', 86400) then
    redis.call('INCRBYFLOAT', day, delta)
    redis.call('INCRBYFLOAT', month, delta)
    return 1
  end
  return 0
end
