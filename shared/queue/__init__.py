"""The queue contract shared by the producer and the workers, in one room.

- `contract`: task names, payloads, step ids, the Redis keys perq owns and the JSON serializer; no arq, so
  importing `shared.queue` stays cheap for commands that never talk to the queue;
- `broker`: everything that goes through arq: the arq key names perq reads, the Redis settings and pool,
  and enqueueing a step the way arq does.

Outside this package only `worker/queue/` (the worker side of arq) and the benchmarks import arq.
"""

from shared.queue.contract import (
    CANCEL_MARK_TTL_S,
    CANCEL_PREFIX,
    STEP_ID_PREFIX,
    STEP_TASK,
    WORKER_KEY_PREFIX,
    PayloadError,
    StepTask,
    cancel_key,
    deserialize,
    events_channel,
    serialize,
    step_job_id,
    worker_key,
)

__all__ = [
    "CANCEL_MARK_TTL_S",
    "CANCEL_PREFIX",
    "STEP_ID_PREFIX",
    "STEP_TASK",
    "WORKER_KEY_PREFIX",
    "PayloadError",
    "StepTask",
    "cancel_key",
    "deserialize",
    "events_channel",
    "serialize",
    "step_job_id",
    "worker_key",
]
