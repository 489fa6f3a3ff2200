-- KEYS: the 12 session script keys, then the 9 quarantine targets. ARGV: token, client id.
-- (prelude.lua comes first)
local holder = redis.call('GET', LEASE)
if holder and holder ~= ARGV[1] then return {'locked', holder} end
for i = 13, 21 do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {'taken'} end
end
for i = 1, 9 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 12])
    -- RENAME keeps the source's TTL: quarantined data must never expire.
    redis.call('PERSIST', KEYS[i + 12])
  end
end
if not index_damage() then
  redis.call('SREM', SESSIONS, ARGV[2])
  redis.call('ZREM', EXPIRY, ARGV[2])
end
return {'ok'}
