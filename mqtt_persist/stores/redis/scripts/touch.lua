-- ARGV: token, now, format, client id. An empty batch: only an access.
-- (prelude.lua comes first)
local meta, refusal = checked(ARGV[1], ARGV[3], '1')
if refusal then return refusal end
if meta then
  redis.call('HSET', META, 'last_access', ARGV[2])
  refresh_expiry(meta.ttl, number(ARGV[2]), ARGV[4])
end
return {'ok'}
