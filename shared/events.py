"""Live events: workers append each step's events to a Redis stream per job, so that any machine reaching
the same Redis can follow a job while it runs, even without access to the job store.

The stream carries what a follower shows, not the record: messages are left out (the tool calls and results
beside them say the same) and long texts are cut, so a job's stream costs Redis a bounded amount per event
whatever the conversation holds; the store keeps everything. The stream is capped in length, and once the
job stops it expires soon: a follower that comes later reads the store.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic.alias_generators import to_camel

from shared.models import Checkpoint, Event, StepEnd, read_event
from shared.queue import events_channel

STREAM_MAXLEN = 10_000  # events kept per job in Redis; the store keeps them all
STREAM_TTL_S = 24 * 3600  # while the job runs: renewed by every step
STREAM_TTL_AFTER_STOP_S = 600  # once it stopped: long enough for `perq run --wait` and friends to catch up
LIVE_TEXT_LIMIT = 200  # characters of a string a live event keeps (tool results, arguments, queries)
LIVE_RESULT_LIMIT = 4000  # the final text of a run, which followers print whole when it is short
# messages (the calls and results beside them say the same) and a step's record (its checkpoint has the usage)
_DROPPED_FIELDS = frozenset({"new_message", "new_messages", "messages", "step"})
_DROPPED = frozenset(map(to_camel, _DROPPED_FIELDS))  # the same, as the JSON keys
# what a follower shows of a step's end: where the job is, what it cost, whom it waits on, its todo list;
# with the ids and expert every checkpoint has, so that the follower reads it as a checkpoint
_LIVE_CHECKPOINT_FIELDS = {"id", "job_id", "run_id", "expert", "status", "step_number", "usage"} | {
    "delegated_by",
    "error",
    "pending_tool_calls",
    "todos",
}


def _cut(value: Any, limit: int) -> Any:
    """`value` (as json.loads made it) with every string longer than `limit` cut; a container is looked
    into, a number or a short string is kept as it is without a call (an event holds dozens of them)."""
    kind = type(value)
    if kind is str:
        return value if len(value) <= limit else value[:limit] + "…"
    if kind is dict:
        return {
            k: _cut(v, limit) if type(v) in _CONTAINERS or (type(v) is str and len(v) > limit) else v
            for k, v in value.items()
        }
    if kind is list:
        return [
            _cut(v, limit) if type(v) in _CONTAINERS or (type(v) is str and len(v) > limit) else v
            for v in value
        ]
    return value


_CONTAINERS = (dict, list)


# a step's end made here, as the stream carries it: its record and messages left out, its checkpoint cut to
# what a follower shows
_LIVE_STEP_END_EXCLUDE: dict[str, Any] = {name: True for name in _DROPPED_FIELDS} | {
    "checkpoint": set(Checkpoint.model_fields) - _LIVE_CHECKPOINT_FIELDS
}


def _may_hold_long_strings(line: str) -> bool:
    """Whether a JSON line may hold a string longer than the live limit. Without an escaped quote, every
    string's text lies between two quotes, written with at least as many characters as it holds."""
    return '\\"' in line or max(map(len, line.split('"'))) > LIVE_TEXT_LIMIT


def live_line(event: Event) -> str:
    """The event as the live stream carries it: without messages or the step's record, long strings cut, and
    a step's end with what a follower shows of its checkpoint (status, step, usage, delegation, error).

    A step's hot path (bench: throughput): most events are their stored line as it is (nothing to leave out,
    nothing to cut), and a step's end made here is dumped straight from its models; neither is parsed."""
    if isinstance(event, StepEnd) and not event.was_read:
        line = event.model_dump_json(by_alias=True, exclude_none=True, exclude=_LIVE_STEP_END_EXCLUDE)
        if not _may_hold_long_strings(line):
            return line
        data = json.loads(line)
    else:
        line = event.to_json()
        if (
            not isinstance(event, StepEnd)
            and not event.model_fields_set & _DROPPED_FIELDS
            and not _may_hold_long_strings(line)
        ):
            return line
        data = json.loads(line)
        if isinstance(event, StepEnd):
            data["checkpoint"] = event.checkpoint.model_dump(
                mode="json", by_alias=True, exclude_none=True, include=_LIVE_CHECKPOINT_FIELDS
            )
        for key in _DROPPED:
            data.pop(key, None)
    text = data.pop("text", None)
    data = _cut(data, LIVE_TEXT_LIMIT)
    if isinstance(text, str):
        data["text"] = _cut(text, LIVE_RESULT_LIMIT)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def live_lines(events: list[Event]) -> list[str]:
    return [live_line(e) for e in events]


def add_events(pipe: Any, job_id: str, lines: list[str], *, stopped: bool = False) -> None:
    """Queue the XADDs of a job's serialized events on a Redis pipeline (the caller executes it).
    `stopped`: the job stopped with these events; the stream then expires soon."""
    key = events_channel(job_id)
    for line in lines:
        pipe.xadd(key, {"e": line}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, STREAM_TTL_AFTER_STOP_S if stopped else STREAM_TTL_S)


async def publish_events(redis: Any, job_id: str, events: list[Event]) -> None:
    if events:
        async with redis.pipeline(transaction=False) as pipe:
            add_events(pipe, job_id, [e.to_json() for e in events])
            await pipe.execute()


async def follow_events(
    redis: Any, job_id: str, *, start: str = "0-0", block_ms: int = 500
) -> AsyncIterator[Event | None]:
    """Yield the job's events in order from `start`, each as its own type (read tolerantly: one of a type
    this follower does not know comes as an `UnknownEvent`); yields None after each quiet `block_ms`."""
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
                    yield read_event(raw)
