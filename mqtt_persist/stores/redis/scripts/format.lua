-- KEYS: P:format. ARGV: our version. Returns the version found (ours when there was none); an
-- older prefix is raised to ours (its sessions migrate one by one as they are used).
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
if string.match(v, '^%d+$') and #v < 10 and tonumber(v) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return v
