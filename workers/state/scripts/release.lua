-- KEYS[1]: a key; ARGV[1]: the value it must still hold. Deletes it only then, so a
-- sender releases its own claim and never one another sender took meanwhile.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
