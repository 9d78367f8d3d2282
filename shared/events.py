"""Live events: workers append each step's events to a Redis stream per job, so that any machine reaching
the same Redis can follow a job while it runs, even without access to the job store.

The stream carries what a follower shows, not the record: messages are left out (the tool calls and results
beside them say the same) and long texts are cut, so a job's stream costs Redis a bounded amount per event
whatever the conversation holds; the store keeps everything. The stream is capped in length, and once the
job stops it expires soon: a follower that comes later reads the store.
"""

from __future__ import annotations

import json
import re
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
    if isinstance(event, StepEnd) or _holds_dropped(event):
        line = event.model_dump_json(by_alias=True, exclude_none=True, exclude=_live_exclude(event.type))
    else:  # the stored line leaves out what the live form drops, as its fields are None (`exclude_none`)
        line = event.to_json()
    return _cut_line(line, final_text="text" in type(event).model_fields)


def _holds_dropped(event: Event) -> bool:
    """Whether the event holds something the live form drops (`_DROPPED_FIELDS`: a field that is not None)."""
    kind = type(event)
    dropped = _DROPPED_OF.get(kind)
    if dropped is None:
        dropped = _DROPPED_OF[kind] = tuple(_DROPPED_FIELDS.intersection(kind.model_fields))
    values = event.__dict__
    return any(values.get(name) is not None for name in dropped)


_DROPPED_OF: dict[type[Event], tuple[str, ...]] = {}  # each event class's fields among `_DROPPED_FIELDS`


def _cut_event(data: dict[str, Any]) -> dict[str, Any]:
    """An event's strings cut: its final text (top-level `text`) at the result's limit, all others at the
    live limit."""
    text = data.pop("text", None)
    data = _cut(data, LIVE_TEXT_LIMIT)
    if isinstance(text, str):
        data["text"] = _cut(text, LIVE_RESULT_LIMIT)
    return data


def _cut_line(line: str, *, final_text: bool) -> str:
    """`_cut_event` on a compact JSON line (as pydantic and `_dumps` write one), without parsing it: in a copy
    of the line with every escaped backslash or quote (`\\\\`, `\\"`) spelled as two other characters, at
    the same places, every quote opens or closes a string, so a run of more than the limit's characters
    without a quote lies in a string when an odd number of quotes comes up to it, and a string written with
    more characters than the limit is the only one that may hold more. Such a string followed by `:` is a
    key (never cut); with `final_text` (the event has a `text` field), one after `"text":` at the top level
    is the final text."""
    if len(line) <= LIVE_TEXT_LIMIT:  # nothing in it can be long: at once
        return line
    # escapes read left to right: `\\\\"` is an escaped backslash, then a closing quote
    plain = line.replace("\\\\", "__").replace('\\"', "__") if "\\" in line else line
    cut: list[str] = []
    done = 0  # how much of the line is in `cut`
    for run in _LONG_RUN.finditer(plain):
        start, end = run.start() + 1, run.end()  # the run, after the quote it follows
        if plain.count('"', 0, start) % 2 == 0 or plain.startswith(":", end + 1):
            continue  # outside any string (a quote closed a string before it), or a key
        limit = LIVE_TEXT_LIMIT
        if final_text and plain.endswith('"text":"', 0, start):  # the event's own text, if at the top level
            outside = "".join(plain[:start].split('"')[0::2])
            depth = outside.count("{") + outside.count("[") - outside.count("}") - outside.count("]")
            limit = LIVE_RESULT_LIMIT if depth == 1 else LIVE_TEXT_LIMIT
            if end - start <= limit:
                continue
        text = json.loads(line[start - 1 : end + 1])
        if len(text) > limit:
            cut += [line[done:start], _dumps(text[:limit] + "…")[1:-1]]
            done = end
    return "".join([*cut, line[done:]]) if cut else line


# a quote and a run of more characters than the live limit without one: the only strings that may be cut
# (anchored at the quote: a search from every character of a run would go over it again at each)
_LONG_RUN = re.compile(f'"[^"]{{{LIVE_TEXT_LIMIT + 1},}}')


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def live_lines(events: list[Event]) -> list[str]:
    return [live_line(e) for e in events]


def stream_lifetime_s(stopped: bool) -> int:
    """How long a job's stream lives after its latest events: a day while the job runs, minutes once it
    `stopped`."""
    return STREAM_TTL_AFTER_STOP_S if stopped else STREAM_TTL_S


async def publish_events(redis: Any, job_id: str, events: list[Event]) -> None:
    """Add events to a job's stream as they are stored (a worker publishes a step's live form, in one script
    call: worker/queue/publish.lua)."""
    if events:
        key = events_channel(job_id)
        async with redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(key, {"e": event.to_json()}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(key, stream_lifetime_s(stopped=False))
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
