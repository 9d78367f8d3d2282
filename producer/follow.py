"""Following a job while it runs: from the Redis event stream (any machine), or the store as a fallback.

`perq run --wait`, `perq log --follow` and `perq start`'s live view follow jobs through here; how progress
looks on a terminal is `producer.views.progress`, so that this module knows streams and records, and prints
nothing but the notice that a stream was lost (to stderr, unless the caller shows it its own way).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.log_query import job_events
from producer.views.terminal import say
from shared.events import follow_events
from shared.models import (
    FINAL_JOB_STATUSES,
    JOB_STATUS_AFTER,
    STEP_ENDING_EVENTS,
    CallTools,
    Event,
    Job,
    StepEnd,
    Usage,
    check_id,
    misfit,
    read_event,
)
from shared.queue import cancel_key, events_channel
from shared.store import JobStore, StoreError


@dataclass(frozen=True)
class StepEnding:
    """What a follower needs of the checkpoint a step-ending event carries."""

    status: str
    delegated: bool
    usage: Usage


def step_ending(event: Event) -> StepEnding | None:
    """The checkpoint summary of a step-ending event. An older worker's live form of it lacks the ids the
    typed checkpoint needs and reads as a misfit; its keys still say what a follower needs."""
    if isinstance(event, StepEnd):
        cp = event.checkpoint
        return StepEnding(cp.status, cp.delegated_by is not None, cp.usage)
    raw = (event.model_extra or {}).get("checkpoint") if misfit(event) else None
    if event.type not in STEP_ENDING_EVENTS or not isinstance(raw, dict):
        return None
    if not isinstance(raw.get("status"), str):
        return None
    try:
        usage = Usage.model_validate(raw.get("usage") or {})
    except ValidationError:
        usage = Usage()
    return StepEnding(raw["status"], raw.get("delegatedBy") is not None, usage)


def job_status_after(event: Event) -> str | None:
    """The job status an event settles, if any: the end of a top-level run (not of a delegate)."""
    return _status_after(event, step_ending(event) if event.type in STOPPING_EVENTS else None)


def _status_after(event: Event, ending: StepEnding | None) -> str | None:
    """`job_status_after`, given the step ending `step_ending` read from the event."""
    if ending is None or event.type not in STOPPING_EVENTS:
        return None
    status = JOB_STATUS_AFTER.get(ending.status)
    if ending.delegated and status != "stoppedByMaxSteps":
        return None
    return status


REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# waits between reads of a Redis that cannot be reached: 0.5 s, then doubling up to 2 s, so that a follower
# is back within 2 s of Redis without knocking on it four times a second while it is down for long
RECONNECT_BACKOFF = ExponentialBackoff(cap=2.0, base=0.25)
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
        if isinstance(event, CallTools):
            self.tool_calls += len(event.tool_calls)
        ending = step_ending(event)
        if ending is not None and not ending.delegated:
            self.usage = ending.usage
        status = _status_after(event, ending)
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
    notice: Callable[[str], None] | None = None,
) -> str:
    """Follow a job until it stops; return its final status.

    The events alone are enough: a follower whose store does not hold the job (another machine, a store
    not shared) learns the outcome from the job's last event, or from its cancel mark in Redis (a mark
    counts from `cancelled_since`, ms: an older one cancelled an earlier submission, not this one).
    When Redis goes away or comes back without the job's stream, the follower says so once (`notice`, by
    default a line on stderr), shows the events it missed from the store, and learns the outcome there.
    """
    notice = notice or say
    progress = progress if progress is not None else Progress()
    shown: set[str] = set()  # event ids: after a loss the stream is read again, and the store read too
    since_ms = int(start.split("-")[0])
    lost = False
    read_at = -1.0

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

    def deliver(event: Event) -> bool:
        """Show an event not shown yet; True when it settles the job."""
        if event.id in shown:
            return False
        shown.add(event.id)
        progress.update(event)
        on_event(event, progress)
        return progress.status is not None

    def from_store(*, final: bool = False) -> bool:
        """After a loss: the events the stream no longer has, as the store holds them (once a second)."""
        nonlocal read_at
        if not lost or store is None or (not final and time.monotonic() - read_at < 1.0):
            return False
        read_at = time.monotonic()
        # the segment's events: those after the stream id it starts from (an id begins with its time, ms)
        events = [e for e in job_events(store, job_id, []) if e.timestamp > since_ms and e.id not in shown]
        return any([deliver(e) for e in events])

    def notice_loss(why: str) -> None:
        nonlocal lost
        if not lost:
            lost = True
            where = "the store" if store is not None else "Redis, until it is back"
            notice(f"lost the event stream of job {job_id} ({why}); following it in {where}")

    async def settled() -> str:
        # the job record is written after the events: when this store has the job, let it settle
        if stored_job() is not None:
            for _ in range(20):
                if stored_status():
                    break
                await asyncio.sleep(0.05)
        return stored_status() or progress.status or "running"

    async def follow() -> str:
        failures = 0  # reads in a row that did not reach Redis
        while True:
            try:
                # from the segment's start each time: a Redis that came back may hold a new stream
                async for event in follow_events(redis, job_id, start=start, block_ms=250):
                    failures = 0
                    if event is not None:
                        if deliver(event):
                            from_store(final=True)
                            return await settled()
                        continue
                    # a quiet moment: the stream may have nothing more to say (cancelled, expired, lost)
                    status = stored_status()
                    if status:
                        from_store(final=True)
                        return status
                    if (shown or since_ms) and not await redis.exists(events_channel(job_id)):
                        notice_loss("Redis no longer has it")
                    if from_store():
                        return await settled()
                    mark = await redis.get(cancel_key(job_id))
                    if mark is not None and int(mark) >= cancelled_since:
                        return "cancelled"  # a cancelled job publishes no last event
            except REDIS_ERRORS as e:
                notice_loss(f"Redis: {e}")
                if from_store():
                    return await settled()
                status = stored_status()
                if status:
                    from_store(final=True)
                    return status
                failures += 1  # the client reconnects on its next command
                await asyncio.sleep(RECONNECT_BACKOFF.compute(failures))

    return await asyncio.wait_for(follow(), timeout_s)


async def follow_job(
    redis: Any,
    store: JobStore,
    job_id: str,
    on_event: Callable[[Event, Progress], None],
    *,
    start: str | None = None,
    record: Job | None = None,
    cancelled_since: int = 0,
) -> tuple[str, Progress]:
    """Follow a job until it stops, as `perq run --wait` and `perq log --follow` do; return its final status
    and what its events said.

    From `start` in its stream when the caller knows where (a submission: `stream_position`), else from the
    start of its current segment. `record` is the store's, if it has the job: a stopped job whose stream has
    expired is then read from the store; a job the store does not know is followed in Redis alone.
    """
    seen = Progress()
    if start is None:
        stopped = record is not None and record.status in FINAL_JOB_STATUSES
        if record is not None and stopped and not await redis.exists(events_channel(job_id)):
            # the stream has expired: the store still has every event of the stopped job
            for event in job_events(store, job_id, []):
                seen.update(event)
                on_event(event, seen)
            return record.status, seen
        start = await segment_start(redis, job_id, running=None if record is None else not stopped)
    status = await wait_for_job(
        redis, store, job_id, on_event, start=start, progress=seen, cancelled_since=cancelled_since
    )
    return status, seen


async def stream_position(client: Any, request: Any) -> str:
    """Where the stream of the job `request` continues stands before it is submitted, so that a follower
    (`perq run --wait`, `perq start`) shows only what follows; "0-0" for a new job."""
    job_id = check_id(request.continue_job, "job id") if request.continue_job else None
    if not job_id and request.continue_latest:
        latest = client.store.latest_job()
        job_id = latest.id if latest else None
    if not job_id:
        return "0-0"
    redis = await client.redis()
    last = await redis.xrevrange(events_channel(job_id), count=1)
    return last[0][0].decode() if last else "0-0"


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
            event = read_event(raw)
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
