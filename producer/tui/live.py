"""Following one job for the live view of `perq start`, over Redis, with `perq run --wait`'s follower.

Where to start reading a job's event stream, following it until it stops (`producer.follow.wait_for_job`),
whether any worker is alive to run it (the heartbeats `perq status --queue` counts), and what the view
shows of each event.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text

from producer.api import Client, RunRequest
from producer.follow import Progress, segment_start, wait_for_job
from producer.tui.source import event_label
from shared.models import STREAMING_EVENTS, CompleteRun, Event, Job, StepEnd, Todo

# streaming deltas and generation starts say nothing a person follows; every other event gets a line
QUIET_EVENTS = frozenset({"startGeneration", *STREAMING_EVENTS})


async def position_before(client: Client, request: RunRequest) -> str:
    """Where the job's stream stands before `request` is submitted, so the view shows only what follows.

    The same position `perq run --wait` starts from.
    """
    from producer.follow import stream_position as _stream_position

    return await _stream_position(client, request)


async def position_of_running(client: Client, job: Job) -> str:
    """Where the current segment of a queued or running job begins in its stream."""
    return await segment_start(await client.redis(), job.id, running=True)


async def follow(
    client: Client,
    job_id: str,
    on_event: Callable[[Event, Progress], None],
    *,
    start: str,
    cancelled_since: int,
    progress: Progress,
) -> str:
    """Follow the job until it stops, calling `on_event` for each event; return its final status."""
    redis = await client.redis()
    return await wait_for_job(
        redis,
        client.store,
        job_id,
        on_event,
        start=start,
        progress=progress,
        cancelled_since=cancelled_since,
    )


async def workers_alive(client: Client) -> int:
    """How many workers of this queue have a live heartbeat."""
    from producer.views.queue import queue_stats

    stats = await queue_stats(await client.redis(), client.settings.redis.queue)
    return len(stats.workers)


def event_text(event: Event) -> list[Text]:
    """What the live view writes for an event: its `perq log` line, and a completed run's whole answer."""
    if event.type in QUIET_EVENTS:
        return []
    lines = [event_label(event)]
    if isinstance(event, CompleteRun) and event.text:
        lines.append(Text(event.text, style="bold"))
    return lines


def todos_of(event: Event) -> list[Todo] | None:
    """The todo list as the step that this event ends left it, when the event carries its checkpoint."""
    if not isinstance(event, StepEnd):
        return None
    return list(event.checkpoint.todos or [])


def todo_text(expert: str, todos: list[Todo]) -> Text:
    if not todos:
        return Text("")
    text = Text(f"Todos ({expert}): ", style="bold")
    for n, todo in enumerate(todos):
        if n:
            text.append("  ")
        done = todo.completed
        text.append(("[x] " if done else "[ ] ") + todo.title, style="dim" if done else "")
    return text
