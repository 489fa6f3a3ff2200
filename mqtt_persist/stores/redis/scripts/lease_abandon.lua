-- KEYS: lease, fence. ARGV: the owner value of an acquire that was cancelled in its round trip.
-- That acquire may have taken the lease after all: then the lease still holds its owner value
-- (unique to that attempt) and the fence its token (both are only ever set together), and
-- both go. Anything else is somebody else's and stays.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
