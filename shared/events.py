"""Live events: workers append each step's events to a Redis stream per job, so that any machine reaching
the same Redis can follow a job while it runs, even without access to the job store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from shared.models import Event
from shared.queue import events_channel

STREAM_MAXLEN = 10_000  # events kept per job in Redis; the store keeps them all
STREAM_TTL_S = 7 * 24 * 3600


async def publish_events(redis: Any, job_id: str, events: list[Event]) -> None:
    if not events:
        return
    key = events_channel(job_id)
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(key, {"e": event.to_json()}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(key, STREAM_TTL_S)
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
