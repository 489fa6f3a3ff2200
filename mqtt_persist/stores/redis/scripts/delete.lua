-- ARGV: token, client id.
-- (prelude.lua comes first)
local refusal = lease_refusal(ARGV[1])
if refusal then return refusal end
refusal = index_damage()
if refusal then return refusal end
remove_all(ARGV[2])
return {'ok'}
