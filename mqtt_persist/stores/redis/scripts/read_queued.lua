-- ARGV: first member ('-' or '(' .. SEQ), limit. Reads only.
-- (prelude.lua comes first)
for _, i in ipairs({2, 3, 5}) do
  local refusal = wrong_type('corrupt', KEYS[i], TYPES[i])
  if refusal then return refusal end
end
local seqs = redis.call('ZRANGEBYLEX', QUEUE, ARGV[1], '+', 'LIMIT', 0, ARGV[2])
-- One '0'/'1' per message in one string: every reply element costs the client parsing time.
local released = {}
for s = 1, #seqs, 1000 do
  local part = redis.call('SMISMEMBER', RELEASED, unpack(seqs, s, math.min(s + 999, #seqs)))
  for k = 1, #part do released[#released + 1] = part[k] == 1 and '1' or '0' end
end
local packed, missing = pack_pairs(seqs, hmget_all(MSG, seqs))
if not packed then
  return {'corrupt', QUEUE, 'lists ' .. seqs[missing] .. ', which ' .. MSG .. ' does not hold'}
end
return {'ok', packed, table.concat(released)}
