-- Enqueue one step the way arq's enqueue_job does, without its WATCH round trips, unless its job was
-- cancelled; given the step that hands over, finish that step as arq's finish_job does; and, given a lease
-- owner, take the step at once for that worker, as pick_up.lua would take it.
-- KEYS[1] arq's job key, KEYS[2] arq's result key, KEYS[3] the queue, KEYS[4] the cancel mark,
-- KEYS[5..7] (optional) the finished step's in-progress, retry and job keys,
-- KEYS[8..9] (optional) the step's own in-progress and retry keys
-- ARGV[1] the job as arq serializes it, ARGV[2] the score (ms), ARGV[3] the job key's lifetime (ms),
-- ARGV[4] the step's arq id, ARGV[5] the submission (epoch, ms) the step descends from,
-- ARGV[6] (optional) the finished step's arq id ('' for none),
-- ARGV[7] (optional) the lease owner taking the step ('' for none), ARGV[8] the lease (ms)
-- Returns -1: the job was cancelled after that submission (nothing enqueued, nothing finished); 0: a job
-- with this id is live or its result kept (arq refuses it too); 1: enqueued; {1, try, cancel mark or ''}:
-- enqueued and taken.
local cancelled = redis.call('get', KEYS[4])
if cancelled and tonumber(cancelled) >= tonumber(ARGV[5]) then return -1 end
if ARGV[6] and ARGV[6] ~= '' then
  redis.call('del', KEYS[5], KEYS[6], KEYS[7])
  redis.call('zrem', KEYS[3], ARGV[6])
end
if redis.call('exists', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('psetex', KEYS[1], ARGV[3], ARGV[1])
redis.call('zadd', KEYS[3], ARGV[2], ARGV[4])
if ARGV[7] and ARGV[7] ~= '' and redis.call('exists', KEYS[8]) == 0 then
  redis.call('psetex', KEYS[8], ARGV[8], ARGV[7])
  local tries = redis.call('incr', KEYS[9])
  redis.call('expire', KEYS[9], 88400)
  return {1, tries, cancelled or ''}
end
return 1
