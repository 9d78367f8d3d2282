"""Following a job while it runs: from the Redis event stream (any machine), or the store as a fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shared.events import follow_events
from shared.models import FINAL_JOB_STATUSES, Event, Usage
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
    if not isinstance(checkpoint, dict) or checkpoint.get("delegatedBy"):
        # a delegate's end is handed back to its parent, except max steps, which stops the job (spec §3.7)
        if event.type == "stopRunByExceededMaxSteps":
            return "stoppedByMaxSteps"
        return None
    return {
        "completeRun": "completed",
        "stopRunByInteractiveTool": "stoppedByInteractiveTool",
        "stopRunByExceededMaxSteps": "stoppedByMaxSteps",
        "stopRunByError": "stoppedByError",
    }.get(event.type)


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
) -> str:
    """Follow a job until it stops; return its final status."""
    progress = Progress()

    def stored_status() -> str | None:
        if store is None:
            return None
        try:
            job = store.load_job(job_id)
        except StoreError:
            return None
        return job.status if job and job.status in FINAL_JOB_STATUSES else None

    async def follow() -> str:
        async for event in follow_events(redis, job_id, start=start, block_ms=250):
            if event is not None:
                progress.update(event)
                on_event(event, progress)
                if progress.status:
                    # the job record is written after the events: let it settle before returning
                    for _ in range(20):
                        if stored_status() or store is None:
                            break
                        await asyncio.sleep(0.05)
                    return stored_status() or progress.status
            status = stored_status()
            if status:
                return status
        raise AssertionError("unreachable")

    return await asyncio.wait_for(follow(), timeout_s)
