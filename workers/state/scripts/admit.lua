-- One model's admission (see admission.lua): KEYS and ARGV as its K and A.
--!include admission
local t = redis.call('TIME')
return admission(KEYS, ARGV, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
