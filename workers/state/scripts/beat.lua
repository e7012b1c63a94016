-- A beat entry's health: one field of the beat-health hash per entry (entry -> JSON), so
-- that a job beat fires again and again, failing for a cause already seen since its entry
-- started failing, is counted rather than filed again as a new dead letter. A fragment,
-- included by store_result.lua, which files the letter (or not) in the same step.
-- run: JSON {entry, ok, cause, reason}; now: unix s on Redis' clock.
-- Returns {event, the entry's health as JSON}; event is one of
--   'failing'   the entry starts failing: file the letter
--   'another'   it fails for a cause not seen since it started failing: file the letter
--   'repeat'    it fails for a cause already seen: counted in `repeats`, not filed
--   'recovered' it answers again after failing
--   'ok'        it answers, as before
--   'again'     this job's final state is being written a second time: nothing changes
local MAX_CAUSES = 8  -- a cause flapping beyond this many is counted, not filed

local function beat_failure(health, cause, job_id, now)
  if not health.failing then
    health.failing, health.since, health.repeats = true, now, 0
    health.causes, health.dead_letter, health.recovered_at = {cause}, job_id, nil
    return 'failing'
  end
  for _, seen in ipairs(health.causes) do
    if seen == cause then
      health.repeats = health.repeats + 1
      return 'repeat'
    end
  end
  if #health.causes >= MAX_CAUSES then
    health.repeats = health.repeats + 1
    return 'repeat'
  end
  health.causes[#health.causes + 1] = cause
  health.dead_letter = job_id
  return 'another'
end

local function beat_run(key, job_id, run_json, now)
  local run = cjson.decode(run_json)
  local raw = redis.call('HGET', key, run.entry)
  local health = raw and cjson.decode(raw) or {}
  if health.last_job == job_id then return {'again', raw} end
  health.last_job = job_id
  local event = 'ok'
  if run.ok then
    health.last_ok_at = now
    if health.failing then
      health.failing, health.recovered_at, event = false, now, 'recovered'
    end
  else
    health.last_failed_at, health.reason = now, run.reason
    event = beat_failure(health, run.cause, job_id, now)
  end
  local encoded = cjson.encode(health)
  redis.call('HSET', key, run.entry, encoded)
  return {event, encoded}
end
