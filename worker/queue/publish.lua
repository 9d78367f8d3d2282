-- Publish a step's live events onto its job's stream and, given the step that hands over with nothing to
-- enqueue, finish that step as arq's finish_job does: one call where an XADD per event, an EXPIRE, a DEL and
-- a ZREM each cost the worker a command to pack and a reply to read (bench: job throughput).
-- KEYS[1] the job's event stream; KEYS[2..5] (when finishing) the finished step's in-progress, retry and job
-- keys, and the queue
-- ARGV[1] the stream's length cap (approximate, as XADD MAXLEN ~), ARGV[2] the stream's lifetime (s),
-- ARGV[3] the finished step's arq id ('' for none), ARGV[4..] the events' lines
-- Returns how many events were added; or, when Redis refused them (the stream's key holds something else,
-- or Redis is out of memory), the error as a string: the events are a live copy of what the store holds, so
-- the step is finished all the same (the worker logs it; a follower with the store reads them there).
if redis.replicate_commands then redis.replicate_commands() end  -- Redis 5 and 6: XADD's ids are random
local refused = nil
for i = 4, #ARGV do
  local added = redis.pcall('xadd', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
  if type(added) == 'table' and added.err then
    refused = added.err
    break
  end
end
if #ARGV > 3 and not refused then redis.call('expire', KEYS[1], ARGV[2]) end
if ARGV[3] ~= '' then
  redis.call('del', KEYS[2], KEYS[3], KEYS[4])
  redis.call('zrem', KEYS[5], ARGV[3])
end
if refused then return refused end
return #ARGV - 3
