-- Renew the leases this worker holds, and only those: a worker that paused past its lease may find that
-- another worker has taken the step over, and must not extend that worker's lease as if it were its own.
-- KEYS: the in-progress keys of the steps this worker runs; ARGV[1] the lease (ms), ARGV[2] the owner.
-- Returns how many leases were renewed.
local renewed = 0
for i, key in ipairs(KEYS) do
  local owner = redis.call('get', key)
  if owner == false or owner == ARGV[2] then
    -- SET, not PEXPIRE: a Redis that lost its data gets the lease of a step still running back
    redis.call('set', key, ARGV[2], 'px', ARGV[1])
    renewed = renewed + 1
  end
end
return renewed
