-- KEYS: the 11 session script keys, then the 8 quarantine targets. ARGV: token, client id.
-- (prelude.lua comes first)
local holder = redis.call('GET', LEASE)
if holder and holder ~= ARGV[1] then return {'locked', holder} end
for i = 12, 19 do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {'taken'} end
end
for i = 1, 8 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 11])
    -- RENAME keeps the source's TTL: quarantined data must never expire.
    redis.call('PERSIST', KEYS[i + 11])
  end
end
if not index_damage() then
  redis.call('SREM', SESSIONS, ARGV[2])
  redis.call('ZREM', EXPIRY, ARGV[2])
end
return {'ok'}
