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

from shared.models import STEP_ENDING_EVENTS, Checkpoint, Event, StepEnd, read_event, stored_exclude
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


def _live_exclude(event_type: str) -> dict[str, Any]:
    """What the live form of an event made here leaves out: what its stored line does, its messages and
    record, and of a step's end's checkpoint all but what a follower shows (the stored line has its id)."""
    exclude = _LIVE_EXCLUDE.get(event_type)
    if exclude is None:
        exclude = stored_exclude(event_type) | {name: True for name in _DROPPED_FIELDS}
        if event_type in STEP_ENDING_EVENTS:
            exclude["checkpoint"] = set(Checkpoint.model_fields) - _LIVE_CHECKPOINT_FIELDS
        exclude = _LIVE_EXCLUDE[event_type] = exclude
    return exclude


_LIVE_EXCLUDE: dict[str, dict[str, Any]] = {}


def live_line(event: Event) -> str:
    """The event as the live stream carries it: without messages or the step's record, long strings cut, and
    a step's end with what a follower shows of its checkpoint (status, step, usage, delegation, error).

    A step's hot path (bench: throughput): an event made here is dumped straight from its models (its stored
    line as it is, when it has nothing to leave out) and its long strings are cut in the line itself; an
    event read from a store or a stream is parsed and cut."""
    if event.was_read:
        data = json.loads(event.to_json())
        if isinstance(event, StepEnd):
            data["checkpoint"] = event.checkpoint.model_dump(
                mode="json", by_alias=True, exclude_none=True, include=_LIVE_CHECKPOINT_FIELDS
            )
        for key in _DROPPED:
            data.pop(key, None)
        return _dumps(_cut_event(data))
    if isinstance(event, StepEnd) or _DROPPED_FIELDS.intersection(type(event).model_fields):
        line = event.model_dump_json(by_alias=True, exclude_none=True, exclude=_live_exclude(event.type))
    else:
        line = event.to_json()
    return _cut_line(line)


def _cut_event(data: dict[str, Any]) -> dict[str, Any]:
    """An event's strings cut: its final text (top-level `text`) at the result's limit, all others at the
    live limit."""
    text = data.pop("text", None)
    data = _cut(data, LIVE_TEXT_LIMIT)
    if isinstance(text, str):
        data["text"] = _cut(text, LIVE_RESULT_LIMIT)
    return data


def _cut_line(line: str) -> str:
    """`_cut_event` on a compact JSON line (as pydantic and `_dumps` write one), without parsing it where it
    can: without an escaped quote, the line split at its quotes alternates between what lies outside strings
    and the strings' text, written with at least as many characters as it holds; a string followed by `:` is
    a key (never cut), and one after `"text":` at the top level is the final text."""
    if '\\"' in line:
        return _dumps(_cut_event(json.loads(line)))
    pieces = line.split('"')
    if max(map(len, pieces)) <= LIVE_TEXT_LIMIT:  # the common case, at C's speed
        return line
    long = [i for i in range(1, len(pieces), 2) if len(pieces[i]) > LIVE_TEXT_LIMIT]
    for i in long:
        if pieces[i + 1].startswith(":"):
            continue
        limit = LIVE_TEXT_LIMIT
        if pieces[i - 1] == ":" and pieces[i - 2] == "text":  # a "text" key: the final text at the top level?
            outside = "".join(pieces[0:i:2])
            depth = outside.count("{") + outside.count("[") - outside.count("}") - outside.count("]")
            limit = LIVE_RESULT_LIMIT if depth == 1 else LIVE_TEXT_LIMIT
        text = json.loads(f'"{pieces[i]}"')
        if len(text) > limit:
            pieces[i] = _dumps(text[:limit] + "…")[1:-1]
    return '"'.join(pieces)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def live_lines(events: list[Event]) -> list[str]:
    return [live_line(e) for e in events]


def add_events(pipe: Any, job_id: str, lines: list[str], *, stopped: bool = False) -> None:
    """Queue the XADDs of a job's serialized events on a Redis pipeline (the caller executes it).
    `stopped`: the job stopped with these events; the stream then expires soon."""
    key = events_channel(job_id)
    for line in lines:
        pipe.xadd(key, {"e": line}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, stream_lifetime_s(stopped))


def stream_lifetime_s(stopped: bool) -> int:
    """How long a job's stream lives after its latest events: a day while the job runs, minutes once it
    `stopped`."""
    return STREAM_TTL_AFTER_STOP_S if stopped else STREAM_TTL_S


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
