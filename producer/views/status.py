"""`perq status`: the job list and one job with its checkpoints, on the terminal (rich) or as JSON.

Also the pieces other views and `perq start` show a job by: its status colour, its line, a checkpoint's line.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from rich.table import Table

from producer.views.clock import timestamp
from producer.views.terminal import console, print_json, skipped
from shared.models import Checkpoint, Job
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


def job_line(job: Job) -> str:
    """Perstack's job line: `expertKey - N steps (jobId) (startedAt)`."""
    return f"{job.coordinator_expert_key} - {job.total_steps} steps ({job.id}) ({timestamp(job.started_at)})"


def checkpoint_line(cp: Checkpoint) -> str:
    return f"Step {cp.step_number} ({cp.id})"


def job_list(listing: Listing, *, json_output: bool) -> None:
    if json_output:
        print_json(
            {
                "jobs": [j.to_dict() for j in listing.jobs],
                "total": listing.total,
                "problems": listing.problems,
            }
        )
        return
    out = console()
    if not listing.jobs and not listing.problems:
        out.print("No jobs found")
    for job in listing.jobs:
        style = STATUS_STYLE.get(job.status, "")
        out.print(f"[{style}]{job.status:<24}[/{style}] {job_line(job)}")
    if listing.total > len(listing.jobs) + len(listing.problems):
        out.print(f"... {listing.total - len(listing.jobs)} older jobs not shown (--limit 0 for all)")
    skipped(listing.problems)


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
        print_json(data)
        return
    out = console()
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
    skipped(problems)
