-- KEYS: the 13 session script keys, then the 9 quarantine targets. ARGV: token, client id.
-- (prelude.lua comes first)
local refusal = lease_refusal(ARGV[1])
if refusal then return {'locked', refusal[2]} end
for i = 14, 22 do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {'taken'} end
end
for i = 1, 9 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 13])
    -- RENAME keeps the source's TTL: quarantined data must never expire.
    redis.call('PERSIST', KEYS[i + 13])
  end
end
if not index_damage() then
  redis.call('SREM', SESSIONS, ARGV[2])
  redis.call('ZREM', EXPIRY, ARGV[2])
end
return {'ok'}
