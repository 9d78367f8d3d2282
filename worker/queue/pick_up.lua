-- Take ready steps in one round trip, for one worker, with what running them needs.
-- KEYS[1] the queue (arq's ZSET), KEYS[2] arq's in-progress key prefix, KEYS[3] perq's cancel key prefix,
-- KEYS[4] arq's job key prefix, KEYS[5] arq's retry key prefix
-- ARGV[1] now (ms), ARGV[2] the lease (ms), ARGV[3] the room left in the worker, ARGV[4] the prefix of
-- perq's step ids, ARGV[5] the lease owner (this worker), ARGV[6..] the candidate ids, in queue order
-- For each id: arq's own check (still queued, due, not in progress elsewhere), then the in-progress key is
-- set with the owner as its value, so workers sharing the queue never take the same step twice and a lease
-- says whose it is. Then what arq's run_job reads first: the job (GET) and its try counter (INCR, and the
-- counter's lifetime as arq sets it). Every candidate is looked at until the room is full: ids ahead in the
-- queue may be running elsewhere. Returns id, score, the job's cancel mark ('' when none), the job ('' when
-- its key expired) and the try for each step taken.
local taken = {}
local room = tonumber(ARGV[3])
for i = 6, #ARGV do
  if #taken >= 5 * room then break end
  local id = ARGV[i]
  local score = redis.call('zscore', KEYS[1], id)
  if score and tonumber(score) <= tonumber(ARGV[1]) and redis.call('exists', KEYS[2] .. id) == 0 then
    redis.call('psetex', KEYS[2] .. id, ARGV[2], ARGV[5])
    local job = string.match(id, '^' .. ARGV[4] .. '([^:]+):')
    local mark = job and redis.call('get', KEYS[3] .. job) or ''
    local tries = redis.call('incr', KEYS[5] .. id)
    redis.call('expire', KEYS[5] .. id, 88400)
    taken[#taken + 1] = id
    taken[#taken + 1] = score
    taken[#taken + 1] = mark
    taken[#taken + 1] = redis.call('get', KEYS[4] .. id) or ''
    taken[#taken + 1] = tries
  end
end
return taken
