-- ARGV: token, now, format, client id, ttl seconds ('0': never).
-- (prelude.lua comes first)
local now_s, format, client_id, ttl_s = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local meta, refusal = checked(ARGV[1], format, '1')
if refusal then return refusal end
refusal = index_damage()
if refusal then return refusal end
local now = number(now_s)
if meta and expired(meta, now) then
  remove_all(client_id)
  meta = nil
end
if meta then
  redis.call('HSET', META, 'ttl', ttl_s, 'last_access', now_s)
else
  redis.call('HSET', META, 'v', format, 'created_at', now_s, 'last_access', now_s, 'ttl', ttl_s,
             'last_seq', '0')
  redis.call('SADD', SESSIONS, client_id)
end
local ttl = number(ttl_s)
if ttl > 0 then
  refresh_expiry(ttl, now, client_id)
else
  for k = 1, 9 do redis.call('PERSIST', KEYS[k]) end
  redis.call('ZREM', EXPIRY, client_id)
end
return {'ok'}
