"""Following a job while it runs: from the Redis event stream (any machine), or the store as a fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shared.events import follow_events
from shared.models import FINAL_JOB_STATUSES, JOB_STATUS_AFTER, Event, Job, Usage
from shared.queue import cancel_key, events_channel
from shared.store import JobStore, StoreError

EXIT_CODES = {
    "completed": 0,
    "stoppedByInteractiveTool": 3,
    "stoppedByMaxSteps": 4,
    "stoppedByError": 1,
    "cancelled": 1,
}


def job_status_after(event: Event) -> str | None:
    """The job status an event settles, if any: the end of a top-level run (not of a delegate)."""
    checkpoint = getattr(event, "checkpoint", None)
    if event.type not in STOPPING_EVENTS or not isinstance(checkpoint, dict):
        return None
    status = JOB_STATUS_AFTER.get(checkpoint.get("status", ""))
    if checkpoint.get("delegatedBy") and status != "stoppedByMaxSteps":
        return None
    return status


STOPPING_EVENTS = frozenset(
    {"completeRun", "stopRunByInteractiveTool", "stopRunByExceededMaxSteps", "stopRunByError"}
)


class Progress:
    """What a follower knows so far: the step, the tool calls and the tokens of the job."""

    def __init__(self) -> None:
        self.step = 0
        self.tool_calls = 0
        self.usage = Usage()
        self.expert = ""
        self.status: str | None = None

    def update(self, event: Event) -> None:
        if event.step_number:
            self.step = max(self.step, event.step_number)
        if event.expert_key:
            self.expert = event.expert_key
        if event.type == "callTools":
            self.tool_calls += len(getattr(event, "toolCalls", []) or [])
        checkpoint = getattr(event, "checkpoint", None)
        if isinstance(checkpoint, dict) and "usage" in checkpoint and not checkpoint.get("delegatedBy"):
            self.usage = Usage.model_validate(checkpoint["usage"])
        status = job_status_after(event)
        if status:
            self.status = status

    def line(self) -> str:
        u = self.usage
        return (
            f"{self.expert or '-'}  step {self.step}  tool calls {self.tool_calls}  "
            f"tokens in {u.input_tokens} out {u.output_tokens}"
        )


async def wait_for_job(
    redis: Any,
    store: JobStore | None,
    job_id: str,
    on_event: Callable[[Event, Progress], None],
    *,
    start: str = "0-0",
    timeout_s: float | None = None,
    progress: Progress | None = None,
    cancelled_since: int = 0,
) -> str:
    """Follow a job until it stops; return its final status.

    The events alone are enough: a follower whose store does not hold the job (another machine, a store
    not shared) learns the outcome from the job's last event, or from its cancel mark in Redis (a mark
    counts from `cancelled_since`, ms: an older one cancelled an earlier submission, not this one).
    """
    progress = progress if progress is not None else Progress()

    def stored_job() -> Job | None:
        if store is None:
            return None
        try:
            return store.load_job(job_id)
        except StoreError:
            return None

    def stored_status() -> str | None:
        job = stored_job()
        return job.status if job and job.status in FINAL_JOB_STATUSES else None

    async def follow() -> str:
        async for event in follow_events(redis, job_id, start=start, block_ms=250):
            if event is not None:
                progress.update(event)
                on_event(event, progress)
                if progress.status:
                    # the job record is written after the events: when this store has the job, let it settle
                    if stored_job() is not None:
                        for _ in range(20):
                            if stored_status():
                                break
                            await asyncio.sleep(0.05)
                    return stored_status() or progress.status
                continue
            # a quiet moment: the stream may have nothing more to say (cancelled, or expired) — ask the store
            status = stored_status()
            if status:
                return status
            mark = await redis.get(cancel_key(job_id))
            if mark is not None and int(mark) >= cancelled_since:
                return "cancelled"  # a cancelled job publishes no last event
        raise AssertionError("unreachable")

    return await asyncio.wait_for(follow(), timeout_s)


async def segment_start(redis: Any, job_id: str, *, running: bool | None) -> str:
    """Where to start reading a job's stream to see its current segment (a continuation starts a new one).

    A running job's segment starts after the last event that stopped the job; a stopped job's segment is
    the one that ended with that event. `running=None` (the store does not know the job) takes a stream
    that ends with a stopping event as a stopped job.
    """
    key = events_channel(job_id)
    stops: list[str] = []  # ids of job-stopping events, newest first
    newest: str | None = None
    upper = "+"
    while len(stops) < 2:
        entries = await redis.xrevrange(key, max=upper, min="-", count=200)
        if not entries:
            break
        for entry_id, fields in entries:
            entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            raw = fields.get(b"e") or fields.get("e")
            if raw is None:
                continue
            event = Event.model_validate_json(raw)
            if newest is None:
                newest = entry
            if job_status_after(event) is not None:
                stops.append(entry)
                if len(stops) == 2:
                    break
        upper = "(" + (entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else str(entries[-1][0]))
    if running is None:
        running = not stops or stops[0] != newest
    skip = 0 if running else 1  # a stopped job: its segment began after the stop before the last
    return stops[skip] if len(stops) > skip else "0-0"
