-- Trim every class's dead letters to its retention (`fleet dead-letter list`, `fleet
-- status`: what an operator reads is never past retention, even for a class that has
-- filed nothing since). Filing a letter trims its own class already (store_result.lua).
-- KEYS: the dead-letter hash, the trimmed counts, then one index per class.
-- ARGV: per class, in the order of its index: its name, max count, max age in s.
-- Returns the number of letters taken out per class, in the same order.
--!include deadletter
local now = now_s()
local gone = {}
for i = 3, #KEYS do
  local at = (i - 3) * 3
  gone[#gone + 1] = trim_dead_letters(KEYS[1], KEYS[i], KEYS[2], ARGV[at + 1],
    tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), now)
end
return gone
