"""Live events: workers append each step's events to a Redis stream per job, so that any machine reaching
the same Redis can follow a job while it runs, even without access to the job store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from shared.models import Event
from shared.queue import events_channel

STREAM_MAXLEN = 10_000  # events kept per job in Redis; the store keeps them all
STREAM_TTL_S = 7 * 24 * 3600


def add_events(pipe: Any, job_id: str, lines: list[str]) -> None:
    """Queue the XADDs of a job's serialized events on a Redis pipeline (the caller executes it)."""
    key = events_channel(job_id)
    for line in lines:
        pipe.xadd(key, {"e": line}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, STREAM_TTL_S)


async def publish_events(redis: Any, job_id: str, events: list[Event]) -> None:
    if events:
        async with redis.pipeline(transaction=False) as pipe:
            add_events(pipe, job_id, [e.to_json() for e in events])
            await pipe.execute()


async def follow_events(
    redis: Any, job_id: str, *, start: str = "0-0", block_ms: int = 500
) -> AsyncIterator[Event | None]:
    """Yield the job's events in order from `start`; yields None after each quiet `block_ms`."""
    key = events_channel(job_id)
    last = start
    while True:
        reply = await redis.xread({key: last}, count=500, block=block_ms)
        if not reply:
            yield None
            continue
        for _stream, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                raw = fields.get(b"e") or fields.get("e")
                if raw is not None:
                    yield Event.model_validate_json(raw)
