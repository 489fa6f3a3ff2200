-- Format 1 -> 2 of one session. ARGV: token, now, format, client id.
-- (prelude.lua comes first)
-- Version 2 reads every version-1 value as it is (a stored MessageAdded gained only optional
-- fields, a subscription value only higher bits); what version 1 never stored is the protocol
-- level, and version 1 spoke MQTT 3.1.1 (level 4) only.
local refusal = lease_refusal(ARGV[1])
if refusal then return refusal end
refusal = damage('1')
if refusal then return refusal end
if redis.call('HGET', META, 'v') == '1' then
  redis.call('HSET', META, 'v', '2', 'protocol', '4')
end
return {'ok'}
