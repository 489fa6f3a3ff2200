-- ARGV: now, client id, format. 1 when the session was expired (by the clock, or already by
-- Redis) and is now gone; 0 when it is held by a lease, was touched since, or is damaged (load
-- reports damage, and quarantines it; cleanup never deletes what it cannot read).
-- (prelude.lua comes first)
local client_id = ARGV[2]
if redis.call('EXISTS', LEASE) == 1 then return 0 end
if damage(ALL) or index_damage() then return 0 end
if redis.call('EXISTS', META) == 0 then
  redis.call('DEL', FENCE)
  return (redis.call('SREM', SESSIONS, client_id) + redis.call('ZREM', EXPIRY, client_id) > 0)
         and 1 or 0
end
local meta, refusal = read_meta(ARGV[3])
if refusal then return 0 end
if expired(meta, number(ARGV[1])) then
  remove_all(client_id)
  -- The lease lapsed: a former owner that wakes up must be fenced, not write into nothing.
  redis.call('DEL', FENCE)
  return 1
end
if meta.ttl == 0 then redis.call('ZREM', EXPIRY, client_id) end
return 0
