-- KEYS: lease, fence. ARGV: our token, our owner value.
-- The lease goes only if it is ours, the fence only if it holds our token: a released token is
-- never current again (a new owner gets a new one from the counter).
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
