-- ARGV: token, now, format, client id, queued limit (-1: all).
-- (prelude.lua comes first)
local now_s, client_id = ARGV[2], ARGV[4]
local refusal = lease_refusal(ARGV[1])
if refusal then return refusal end
refusal = damage(ALL) or index_damage()
if refusal then return refusal end
if redis.call('EXISTS', META) == 0 then
  -- Still indexed but without data: Redis expired it (every key carries the session's TTL).
  if redis.call('SREM', SESSIONS, client_id) == 1 then
    redis.call('ZREM', EXPIRY, client_id)
    return {'gone'}
  end
  return {'none'}
end
local meta
meta, refusal = read_meta(ARGV[3])
if refusal then return refusal end
local now = number(now_s)
if expired(meta, now) then
  remove_all(client_id)
  return {'expired'}
end
redis.call('HSET', META, 'last_access', now_s)
refresh_expiry(meta.ttl, now, client_id)
local inflight = redis.call('HGETALL', INFLIGHT)
local seqs, values = {}, {}
if ARGV[5] == '-1' then
  local all = redis.call('HGETALL', MSG)
  for k = 1, #all, 2 do
    seqs[#seqs + 1] = all[k]
    values[#values + 1] = all[k + 1]
  end
else
  -- Every in-flight message, then the lowest queued ones.
  for k = 1, #inflight, 2 do seqs[#seqs + 1] = inflight[k] end
  local queued = redis.call('ZRANGEBYLEX', QUEUE, '-', '+', 'LIMIT', 0, ARGV[5])
  for k = 1, #queued do seqs[#seqs + 1] = queued[k] end
  values = hmget_all(MSG, seqs)
end
local packed, missing = pack_pairs(seqs, values)
if not packed then
  local lister = QUEUE
  if 2 * missing <= #inflight then lister = INFLIGHT end
  return {'corrupt', lister, 'lists ' .. seqs[missing] .. ', which ' .. MSG .. ' does not hold'}
end
return {'ok', {meta.created_at_s, now_s, meta.ttl_s, meta.last_seq, meta.protocol}, inflight,
        packed, redis.call('ZCARD', QUEUE), redis.call('HLEN', MSG),
        redis.call('SMEMBERS', RELEASED), redis.call('SMEMBERS', INBOUND),
        redis.call('HGETALL', SUBS), redis.call('SMEMBERS', UNSUB), redis.call('HGETALL', ASIDE)}
