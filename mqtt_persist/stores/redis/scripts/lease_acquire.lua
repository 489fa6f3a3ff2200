-- KEYS: lease, fence, the fencing counter. ARGV: our owner value, ttl ms, '1' to take the lease
-- from a live holder, the holder we may replace ('' none: one we found dead).
-- A new owner: a new token from the counter, the lease in our name, the fence set to our token
-- (every later write of an earlier owner is refused). Returns {'ok', token} or {'held', holder}.
local holder = redis.call('GET', KEYS[1])
if holder and ARGV[3] ~= '1' and holder ~= ARGV[4] then return {'held', holder} end
local token = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], token)
return {'ok', tostring(token)}
