-- Drop a lease this worker holds: the in-progress key goes only if its value is this worker's id (a lease
-- another worker has taken since is left alone). KEYS[1] the in-progress key, ARGV[1] this worker's id.
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
