"""The queue contract between producer and workers: task names, payloads, ids, perq's keys, the serializer.

Plain data and pure functions, no arq and no Redis client: every room may import it cheaply (the producer's
event followers, the store, the worker loop). What needs arq is in `shared/queue/broker.py`.

One arq job is one step of one run. Its arq id is derived from the run and the step, so enqueuing the
same continuation twice is a no-op (arq refuses a second job with a live id), and a worker that re-runs
a step finds the checkpoint the first attempt wrote.
"""

from __future__ import annotations

import json
from typing import Any

from shared.models import PerqModel, SafeId

STEP_TASK = "perq.step"


class StepTask(PerqModel):
    """Run step `step_number` of run `run_id` of job `job_id`."""

    job_id: SafeId
    run_id: SafeId
    step_number: int


STEP_ID_PREFIX = "perq:"
CANCEL_PREFIX = "perq:cancel:"
CANCEL_MARK_TTL_S = 30 * 24 * 3600  # longer than any step of a cancelled submission could wait in the queue


def step_job_id(task: StepTask) -> str:
    """The arq id of a step: `perq:{jobId}:{runId}:{step}` (the pick-up script reads the job id from it)."""
    return f"{STEP_ID_PREFIX}{task.job_id}:{task.run_id}:{task.step_number}"


def cancel_key(job_id: str) -> str:
    return f"{CANCEL_PREFIX}{job_id}"


def events_channel(job_id: str) -> str:
    return f"perq:events:{job_id}"


WORKER_KEY_PREFIX = "perq:worker:"


def worker_key(worker_id: str) -> str:
    """A live worker's heartbeat: JSON about it, expiring unless the worker renews it."""
    return f"{WORKER_KEY_PREFIX}{worker_id}"


class PayloadError(ValueError):
    """A queue payload that is not perq's JSON: refused before anything runs."""


def serialize(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def deserialize(data: bytes) -> dict[str, Any]:
    """JSON only. A pickled payload (or anything else) raises here, so arq fails the job unexecuted."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"queue payload is not JSON ({len(data)} bytes, starts {data[:8]!r})") from e
    if not isinstance(obj, dict):
        raise PayloadError("queue payload is not a JSON object")
    return obj
