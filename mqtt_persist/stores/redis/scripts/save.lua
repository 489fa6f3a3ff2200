-- ARGV: token, now, format, client id, last_seq, protocol ('' if none), then counted sections:
-- messages (SEQ, value, packet id or '', released '1'/'0'), inbound packet ids, subscriptions
-- (filter, value), filters with an UNSUBSCRIBE pending, set-aside messages (SEQ, value).
-- (prelude.lua comes first)
local token, now_s, format, client_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local meta, refusal = checked(token, format, ALL)
if refusal then return refusal end
refusal = index_damage()
if refusal then return refusal end
local created, ttl_s, last = now_s, '0', ARGV[5]
if meta then
  created, ttl_s = meta.created_at_s, meta.ttl_s
  -- Sequence numbers only grow: a snapshot never hands out one the session already used.
  if seq_less(last, meta.last_seq) then last = meta.last_seq end
end
redis.call('DEL', META, MSG, QUEUE, INFLIGHT, RELEASED, INBOUND, SUBS, UNSUB, ASIDE)
redis.call('HSET', META, 'v', format, 'created_at', created, 'last_access', now_s, 'ttl', ttl_s,
           'last_seq', last)
if ARGV[6] ~= '' then redis.call('HSET', META, 'protocol', ARGV[6]) end
redis.call('SADD', SESSIONS, client_id)
local i = 7
local msgs, queue, inflight, released = {}, {}, {}, {}
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local sk = ARGV[i]
  msgs[#msgs + 1] = sk; msgs[#msgs + 1] = ARGV[i + 1]
  if ARGV[i + 2] == '' then
    queue[#queue + 1] = 0; queue[#queue + 1] = sk
  else
    inflight[#inflight + 1] = sk; inflight[#inflight + 1] = ARGV[i + 2]
  end
  if ARGV[i + 3] == '1' then released[#released + 1] = sk end
  i = i + 4
end
bulk('HSET', MSG, msgs); bulk('ZADD', QUEUE, queue); bulk('HSET', INFLIGHT, inflight)
bulk('SADD', RELEASED, released)
local sections = {{'SADD', INBOUND, 1}, {'HSET', SUBS, 2}, {'SADD', UNSUB, 1}, {'HSET', ASIDE, 2}}
for _, section in ipairs(sections) do
  n = tonumber(ARGV[i]) * section[3]; i = i + 1
  local args = {}
  for k = 1, n do args[k] = ARGV[i + k - 1] end
  i = i + n
  bulk(section[1], section[2], args)
end
refresh_expiry(number(ttl_s), number(now_s), client_id)
return {'ok'}
