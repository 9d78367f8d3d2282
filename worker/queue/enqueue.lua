-- Enqueue one step the way arq's enqueue_job does, without its WATCH round trips, unless its job was
-- cancelled; and, given the step that hands over, finish that step as arq's finish_job does.
-- KEYS[1] arq's job key, KEYS[2] arq's result key, KEYS[3] the queue, KEYS[4] the cancel mark,
-- KEYS[5..7] (optional) the finished step's in-progress, retry and job keys
-- ARGV[1] the job as arq serializes it, ARGV[2] the score (ms), ARGV[3] the job key's lifetime (ms),
-- ARGV[4] the step's arq id, ARGV[5] the submission (epoch, ms) the step descends from,
-- ARGV[6] (optional) the finished step's arq id
-- Returns -1: the job was cancelled after that submission (nothing enqueued, nothing finished); 0: a job
-- with this id is live or its result kept (arq refuses it too); 1: enqueued.
local cancelled = redis.call('get', KEYS[4])
if cancelled and tonumber(cancelled) >= tonumber(ARGV[5]) then return -1 end
if KEYS[7] then
  redis.call('del', KEYS[5], KEYS[6], KEYS[7])
  redis.call('zrem', KEYS[3], ARGV[6])
end
if redis.call('exists', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('psetex', KEYS[1], ARGV[3], ARGV[1])
redis.call('zadd', KEYS[3], ARGV[2], ARGV[4])
return 1
