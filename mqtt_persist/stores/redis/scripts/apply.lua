-- apply: one batch of journal operations, atomically. (prelude.lua comes first.)
-- ARGV: token, now, format, client id, highest added seq ('' if none), the mask of session keys
-- the operations touch, the operations (see codec.encode_ops).
--
-- What each operation does to the keys: one branch per operation code. The codes and the
-- Python side that sends them are codec.RULES; a test checks that every code there has exactly
-- one branch here, naming the same operation type, and none else.
local token, now_s, format, client_id, top = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local meta, refusal = checked(token, format, ARGV[6])
if refusal then return refusal end
if meta then
  redis.call('HSET', META, 'last_access', now_s)
else
  redis.call('HSET', META, 'v', format, 'created_at', now_s, 'last_access', now_s, 'ttl', '0',
             'last_seq', '0')
  redis.call('SADD', SESSIONS, client_id)
  meta = {ttl = 0, last_seq = '0'}
end
-- The operations arrive as ONE argument, every field headed by its 4-byte length: one argument
-- per field would cost the client more to send than the whole script costs Redis.
local blob, pos, size = ARGV[7], 1, #ARGV[7]
local function field()
  local length = struct.unpack('>I4', blob, pos)
  local value = string.sub(blob, pos + 4, pos + 3 + length)
  pos = pos + 4 + length
  return value
end
while pos <= size do
  local op = field()
  if op == 'A' then -- MessageAdded
    local sk = field()
    local value = field()
    local pid = field()
    local released = field()
    if redis.call('HSETNX', MSG, sk, value) == 1 then
      if pid == '' then
        redis.call('ZADD', QUEUE, 0, sk)
      else
        redis.call('HSET', INFLIGHT, sk, pid)
      end
      if released == '1' then redis.call('SADD', RELEASED, sk) end
    end
  elseif op == 'P' then -- PacketIdAssigned
    local sk = field()
    local pid = field()
    if redis.call('HEXISTS', MSG, sk) == 1 then
      redis.call('HSET', INFLIGHT, sk, pid)
      redis.call('ZREM', QUEUE, sk)
    end
  elseif op == 'L' then -- MessageReleased
    local sk = field()
    if redis.call('HEXISTS', MSG, sk) == 1 then redis.call('SADD', RELEASED, sk) end
  elseif op == 'Q' then -- MessageRequeued
    local sk = field()
    if redis.call('HEXISTS', MSG, sk) == 1 then
      redis.call('HDEL', INFLIGHT, sk)
      redis.call('SREM', RELEASED, sk)
      redis.call('ZADD', QUEUE, 0, sk)
    end
  elseif op == 'R' then -- MessageRemoved
    local sk = field()
    if redis.call('HDEL', MSG, sk) == 1 then
      redis.call('HDEL', INFLIGHT, sk)
      redis.call('SREM', RELEASED, sk)
      redis.call('ZREM', QUEUE, sk)
    end
  elseif op == 'I' then -- InboundReceived
    redis.call('SADD', INBOUND, field())
  elseif op == 'i' then -- InboundReleased
    redis.call('SREM', INBOUND, field())
  elseif op == 'C' then -- InboundCleared
    redis.call('DEL', INBOUND)
  elseif op == 'S' then -- SubscriptionSet
    local topic_filter = field()
    redis.call('HSET', SUBS, topic_filter, field())
    redis.call('SREM', UNSUB, topic_filter)
  elseif op == 'U' then -- SubscriptionRemoved
    local topic_filter = field()
    redis.call('HDEL', SUBS, topic_filter)
    if field() == '1' then redis.call('SADD', UNSUB, topic_filter) end
  elseif op == 'D' then -- UnsubscribeDone
    redis.call('SREM', UNSUB, field())
  elseif op == 'V' then -- ProtocolVersionSet
    redis.call('HSET', META, 'protocol', field())
  elseif op == 'X' then -- MessageSetAside
    local sk = field()
    local set_aside = field()
    -- The stored MessageAdded has no packet id nor released flag: exactly what is kept aside.
    local value = redis.call('HGET', MSG, sk)
    if value then
      redis.call('HSET', ASIDE, sk, value .. set_aside)
      redis.call('HDEL', MSG, sk)
      redis.call('HDEL', INFLIGHT, sk)
      redis.call('SREM', RELEASED, sk)
      redis.call('ZREM', QUEUE, sk)
    end
  elseif op == 'x' then -- SetAsideRemoved
    redis.call('HDEL', ASIDE, field())
  end
end
if top ~= '' and seq_less(meta.last_seq, top) then redis.call('HSET', META, 'last_seq', top) end
refresh_expiry(meta.ttl, number(now_s), client_id)
return {'ok'}
