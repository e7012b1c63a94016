-- Give an app back what was reserved for a job that will never run (its send failed, or
-- it was revoked before it started), unless the job was settled already.
-- KEYS: settled marker, day spend, month spend. ARGV: the amount reserved (USD).
--!include settle
return settle(KEYS[1], KEYS[2], KEYS[3], -tonumber(ARGV[1]))
