"""A job followed while it runs, on the terminal: the one spinner line, the events `perq run --wait` shows
beside it, and the line that ends with the job's final status.

`perq run --wait` and `perq log --follow` show progress this way; the following itself (reading the job's
Redis stream) is `producer.follow`, which knows nothing of terminals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from producer.follow import Progress
from producer.views.clock import time_of_day
from producer.views.status import STATUS_STYLE, job_line
from shared.models import CallTools, CompleteRun, Event, Job, StopRunByError

# what `perq run --wait` shows of a job's events on stderr: its steps' outcomes, not every event
SHOWN_EVENTS = frozenset(
    {
        "callTools",
        "callDelegate",
        "retry",
        "completeRun",
        "stopRunByError",
        "stopRunByInteractiveTool",
        "stopRunByExceededMaxSteps",
    }
)


@contextmanager
def progress_line(out: Console, err: Console, text: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the job's progress on the terminal, never mixed into a redirected stdout; yields the
    function that replaces its text.

    `out` is where the caller prints events: when it is a terminal the line lives there and events print
    above it; when it is a file or a pipe the line goes to `err` (if that is a terminal) and `out` gets only
    the events. On no terminal at all nothing is drawn.
    """
    live_console = out if out.is_terminal else err
    spinner = Spinner("dots", text=text)
    with Live(
        spinner,
        console=live_console,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
        refresh_per_second=8,
    ):
        yield lambda line: spinner.update(text=line)


def event_line(event: Event) -> Text | None:
    """The line `perq run --wait` prints for an event it shows (None for the others)."""
    if event.type not in SHOWN_EVENTS:
        return None
    return Text.assemble(
        (f"{time_of_day(event.timestamp)} step {event.step_number}", "dim"),
        f" {event.expert_key}: {event.type}{_detail(event)}",
    )


def _detail(event: Event) -> str:
    if isinstance(event, CallTools):
        return f" {', '.join(c.tool_name for c in event.tool_calls)}"
    if isinstance(event, CompleteRun):
        return f" {event.text[:80]!r}"
    if isinstance(event, StopRunByError):
        error = event.run_error
        return f" {error.message if error else ''}"
    return ""


def outcome_line(status: str, job_id: str, progress: Progress, job: Job | None = None) -> Text:
    """The last line of a followed job: its status, its job line (from the store's record when the caller
    has it, else from what the events said) and its tokens."""
    if job is None:
        u = progress.usage
        line = f"{progress.expert or '-'} - {progress.step} steps ({job_id})"
    else:
        u = job.usage
        line = job_line(job)
    return Text.assemble(
        (status, STATUS_STYLE.get(status, "")), f": {line} tokens in {u.input_tokens} out {u.output_tokens}"
    )


def outcome_json(status: str, job_id: str, progress: Progress) -> dict[str, object]:
    """The last JSON line of `perq log --follow --json`."""
    return {"jobId": job_id, "status": status, "steps": progress.step, "usage": progress.usage.to_dict()}
