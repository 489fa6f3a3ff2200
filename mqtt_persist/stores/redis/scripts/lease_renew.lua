-- KEYS: lease, fence. ARGV: our token, our owner value, ttl ms.
-- 1 while our lease is live and our token the current one: the lease is extended. 0 once it
-- lapsed or a newer owner took over: a lapsed lease is never set again (a rival may be taking
-- it at this very moment), the store must acquire anew.
if redis.call('GET', KEYS[2]) == ARGV[1] and redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 1 then
  return 1
end
return 0
