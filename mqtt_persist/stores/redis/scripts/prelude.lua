-- Shared by every session script (prepended to it when the scripts are loaded).
-- Shared by every session script. KEYS: the 9 session keys, lease, sessions index, expiry index,
-- fence (the current owner's fencing token).
-- Numbers that must stay exact (sequence numbers, times) travel as strings: Lua numbers are
-- doubles, and Lua's string comparison follows the server's locale, so neither is used on them.
local META, MSG, QUEUE, INFLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local RELEASED, INBOUND, SUBS, UNSUB, ASIDE = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local LEASE, SESSIONS, EXPIRY, FENCE = KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local TYPES = {'hash', 'hash', 'zset', 'hash', 'set', 'set', 'hash', 'set', 'hash'}
local ALL = '123456789' -- the digits of every session key, for damage()

local function number(s)
  local x = tonumber(s)
  if x == nil or x ~= x or x == math.huge or x == -math.huge then return nil end
  return x
end

local function is_int(s)
  return type(s) == 'string' and #s <= 20 and (s == '0' or string.match(s, '^%-?[1-9]%d*$') ~= nil)
end

-- a < b for canonical decimal integers, compared digit by digit.
local function seq_less(a, b)
  if a == b then return false end
  local an, bn = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if an ~= bn then return an end
  if #a ~= #b then return (#a < #b) ~= an end
  for k = 1, #a do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then return (x < y) ~= an end
  end
  return false
end

-- nil when this caller may change the session, else the refusing reply. token: our fencing
-- token, or '' when we hold no lease. A lease holder may write while its lease is live and its
-- token is the session's current one; anyone else only while no lease is live.
local function lease_refusal(token)
  if token == '' then
    local holder = redis.call('GET', LEASE)
    if holder then return {'locked', holder} end
    return nil
  end
  local current = redis.call('GET', FENCE)
  if current ~= token or redis.call('EXISTS', LEASE) == 0 then
    return {'fenced', redis.call('GET', LEASE) or '', current or ''}
  end
  return nil
end

-- nil when key is missing or of the wanted type, else the refusing reply (status given).
local function wrong_type(status, key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' or t == want then return nil end
  return {status, key, 'holds a ' .. t .. ', not a ' .. want}
end

local function index_damage()
  return wrong_type('badkey', SESSIONS, 'set') or wrong_type('badkey', EXPIRY, 'zset')
end

-- Run before the first write: Redis keeps the writes of a script that fails half way, so
-- nothing that could fail (WRONGTYPE above all) may be left for later.
-- mask: digits naming the session keys the script will touch (ALL: all). A session
-- without meta gets every key checked: other keys without meta are damage, not a new session.
local function damage(mask)
  local has_meta = redis.call('EXISTS', META) == 1
  if not has_meta then mask = ALL end
  local any = false
  for k = 1, #mask do
    local i = string.byte(mask, k) - 48
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= 'none' then
      if t ~= TYPES[i] then
        return {'corrupt', KEYS[i], 'holds a ' .. t .. ', not a ' .. TYPES[i]}
      end
      any = true
    end
  end
  if any and not has_meta then
    return {'corrupt', META, 'is missing while the session has other keys'}
  end
  return nil
end

-- The session's meta (nil: no session), or nil and the refusing reply.
local function read_meta(format)
  if redis.call('EXISTS', META) == 0 then return nil, nil end
  local m = redis.call('HMGET', META, 'v', 'created_at', 'last_access', 'ttl', 'last_seq',
                       'protocol')
  local v = m[1]
  if not is_int(v) or string.sub(v, 1, 1) == '-' or #v > 9 then
    return nil, {'corrupt', META, 'field v is not a format version: ' .. tostring(v)}
  end
  if v ~= format then return nil, {'version', v} end
  -- protocol: checked by the Python side, which alone reads it (false: not set).
  local meta = {created_at_s = m[2], last_access = number(m[3]), ttl_s = m[4], ttl = number(m[4]),
                last_seq = m[5], protocol = m[6]}
  local bad
  if not number(m[2]) then
    bad = 'field created_at is not a number'
  elseif not meta.last_access then
    bad = 'field last_access is not a number'
  elseif not meta.ttl or meta.ttl < 0 then
    bad = 'field ttl is not a number >= 0'
  elseif not is_int(meta.last_seq) then
    bad = 'field last_seq is not an integer'
  end
  if bad then return nil, {'corrupt', META, bad} end
  return meta, nil
end

local function expired(meta, now)
  return meta.ttl > 0 and now >= meta.last_access + meta.ttl
end

local function remove_all(client_id)
  redis.call('DEL', META, MSG, QUEUE, INFLIGHT, RELEASED, INBOUND, SUBS, UNSUB, ASIDE)
  redis.call('SREM', SESSIONS, client_id)
  redis.call('ZREM', EXPIRY, client_id)
end

-- Every key gets the same Redis TTL, so Redis reclaims the session whole; P:expiry gets the
-- expiry in the store's clock, which is what exists/load/cleanup_expired decide by.
local function refresh_expiry(ttl, now, client_id)
  if ttl > 0 then
    local ms = string.format('%.0f', math.ceil(ttl * 1000))
    for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ms) end
    redis.call('ZADD', EXPIRY, string.format('%.17g', now + ttl), client_id)
  end
end

local function hmget_all(key, fields)
  local out = {}
  for s = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, s, math.min(s + 999, #fields)))
    for k = 1, #part do out[#out + 1] = part[k] end
  end
  return out
end

-- (SEQ, value) pairs as ONE string, each pair headed by both lengths (2 and 4 bytes, big
-- endian): a client parses every reply element on its own, which costs it far more than this.
-- seqs and values are parallel arrays; a missing value (false) gives nil and its index.
local function pack_pairs(seqs, values)
  local parts = {}
  for k = 1, #seqs do
    local v = values[k]
    if not v then return nil, k end
    parts[#parts + 1] = struct.pack('>I2I4', #seqs[k], #v)
    parts[#parts + 1] = seqs[k]
    parts[#parts + 1] = v
  end
  return table.concat(parts), nil
end

local function bulk(command, key, args)
  for s = 1, #args, 1000 do
    redis.call(command, key, unpack(args, s, math.min(s + 999, #args)))
  end
end

-- Everything a writing script checks before its first write: the lease, the types of the keys
-- in mask, meta, and the index keys it will write (SESSIONS when it creates the session,
-- EXPIRY when the session has a TTL). Returns meta (nil: no session) or nil and the refusal.
local function checked(token, format, mask)
  local refusal = lease_refusal(token)
  if refusal then return nil, refusal end
  refusal = damage(mask)
  if refusal then return nil, refusal end
  local meta
  meta, refusal = read_meta(format)
  if refusal then return nil, refusal end
  if not meta then
    refusal = wrong_type('badkey', SESSIONS, 'set') or wrong_type('badkey', EXPIRY, 'zset')
  elseif meta.ttl > 0 then
    refusal = wrong_type('badkey', EXPIRY, 'zset')
  end
  return meta, refusal
end
