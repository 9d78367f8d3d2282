"""Terminal output for status and progress (rich), and the JSON forms of the same data."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from producer.follow import Progress, wait_for_job
from shared.models import CallTools, Checkpoint, CompleteRun, Event, Job, StopRunByError
from shared.store import Listing

STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "queued": "blue",
    "stoppedByInteractiveTool": "yellow",
    "stoppedByMaxSteps": "magenta",
    "stoppedByError": "red",
    "cancelled": "red",
}


def timestamp(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")


def error_line(message: str, code: int) -> int:
    """Say what went wrong in one line on stderr; return the exit code for the caller to exit with."""
    print(f"perq: {message}", file=sys.stderr)
    return code


def job_line(job: Job) -> str:
    """Perstack's job line: `expertKey - N steps (jobId) (startedAt)`."""
    return f"{job.coordinator_expert_key} - {job.total_steps} steps ({job.id}) ({timestamp(job.started_at)})"


def checkpoint_line(cp: Checkpoint) -> str:
    return f"Step {cp.step_number} ({cp.id})"


def job_list(listing: Listing, *, json_output: bool) -> None:
    if json_output:
        print(
            json.dumps(
                {
                    "jobs": [j.to_dict() for j in listing.jobs],
                    "total": listing.total,
                    "problems": listing.problems,
                },
                indent=2,
            )
        )
        return
    out = Console(highlight=False, soft_wrap=True)
    if not listing.jobs and not listing.problems:
        out.print("No jobs found")
    for job in listing.jobs:
        style = STATUS_STYLE.get(job.status, "")
        out.print(f"[{style}]{job.status:<24}[/{style}] {job_line(job)}")
    if listing.total > len(listing.jobs) + len(listing.problems):
        out.print(f"... {listing.total - len(listing.jobs)} older jobs not shown (--limit 0 for all)")
    for problem in listing.problems:
        print(f"perq: skipped {problem}", file=sys.stderr)


def answer_command(job: Job, cp: Checkpoint) -> str | None:
    """For a job waiting on an interactive tool: the command that answers it."""
    if cp.status != "stoppedByInteractiveTool" or not cp.pending_tool_calls:
        return None
    return f'perq run {shlex.quote(job.coordinator_expert_key)} --continue-job {job.id} -i "<answer>"'


def job_detail(job: Job, checkpoints: list[Checkpoint], problems: list[str], *, json_output: bool) -> None:
    head = next((c for c in checkpoints if c.id == job.head_checkpoint_id), None)
    waiting = (
        head.pending_tool_calls[0]
        if head and head.status == "stoppedByInteractiveTool" and head.pending_tool_calls
        else None
    )
    if json_output:
        data: dict[str, Any] = {
            "job": job.to_dict(),
            "checkpoints": [
                {
                    "id": c.id,
                    "stepNumber": c.step_number,
                    "status": c.status,
                    "expertKey": c.expert.key,
                    "runId": c.run_id,
                }
                for c in checkpoints
            ],
            "problems": problems,
        }
        if waiting and head:
            data["waitingFor"] = {"toolCall": waiting.to_dict(), "command": answer_command(job, head)}
        print(json.dumps(data, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    style = STATUS_STYLE.get(job.status, "")
    out.print(f"[{style}]{job.status}[/{style}] {job_line(job)}")
    u = job.usage
    out.print(
        f"  usage: input {u.input_tokens}, output {u.output_tokens}, reasoning {u.reasoning_tokens}, "
        f"cached input {u.cached_input_tokens}"
    )
    out.print(f"  started {timestamp(job.started_at)}, finished {timestamp(job.finished_at)}")
    if job.error:
        out.print(f"  [red]error: {job.error.name}: {job.error.message}[/red]")
    if waiting and head:
        out.print(f"  waiting for an answer to [bold]{waiting.tool_name}[/bold] {json.dumps(waiting.args)}")
        out.print(f"  answer with: {answer_command(job, head)}")
    table = Table(box=None, show_header=True, header_style="bold")
    table.add_column("checkpoint")
    table.add_column("status")
    table.add_column("expert")
    for cp in checkpoints:
        table.add_row(checkpoint_line(cp), cp.status, cp.expert.key)
    out.print(table)
    for problem in problems:
        print(f"perq: skipped {problem}", file=sys.stderr)


async def follow_with_progress(
    client: Any, job_id: str, start: str, *, quiet: bool = False, submitted_at: int = 0
) -> str:
    """Show a live progress line on stderr while the job runs; return its final status."""
    redis = await client.redis()
    if quiet:
        return await wait_for_job(
            redis, client.store, job_id, lambda e, p: None, start=start, cancelled_since=submitted_at
        )
    err = Console(stderr=True, highlight=False)
    progress = Progress()
    with err.status(f"job {job_id} queued") as spinner:

        def on_event(event: Event, progress: Progress) -> None:
            spinner.update(progress.line())
            if event.type in SHOWN_EVENTS:
                err.print(
                    f"[dim]{clock(event.timestamp)} step {event.step_number}[/dim] "
                    f"{event.expert_key}: {event.type}{escape(_detail(event))}"
                )

        status = await wait_for_job(
            redis,
            client.store,
            job_id,
            on_event,
            start=start,
            progress=progress,
            cancelled_since=submitted_at,
        )
    summary = progress_summary(client, job_id, progress)
    err.print(Text.assemble((status, STATUS_STYLE.get(status, "")), ": ", summary))
    return status


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


def _detail(event: Event) -> str:
    if isinstance(event, CallTools):
        return f" {', '.join(c.tool_name for c in event.tool_calls)}"
    if isinstance(event, CompleteRun):
        return f" {event.text[:80]!r}"
    if isinstance(event, StopRunByError):
        error = event.error or event.checkpoint.error
        return f" {error.message if error else ''}"
    return ""


def progress_summary(client: Any, job_id: str, progress: Progress | None = None) -> str:
    """The job's line and tokens: from the store's record, else from what its events said."""
    job = client.store.load_job(job_id)
    if job is None:
        if progress is None:
            return job_id
        u = progress.usage
        return (
            f"{progress.expert or '-'} - {progress.step} steps ({job_id}) "
            f"tokens in {u.input_tokens} out {u.output_tokens}"
        )
    u = job.usage
    return f"{job_line(job)} tokens in {u.input_tokens} out {u.output_tokens}"
