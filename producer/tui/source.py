"""What the views of `perq start` show, read from the store and perstack.toml: never a write.

Every reader returns what it could read and names what it could not (a damaged file, a missing config), so
that a view shows a message instead of failing. The store is read only through `JobStore`'s reader methods
and `producer.log_query`; lines are made by `producer.views.status` and `producer.views.log`, as
`perq status` and `perq log` print them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from producer.log_query import run_events
from producer.views.log import event_details, event_lines
from producer.views.status import STATUS_STYLE, checkpoint_line, job_line
from shared.config import ConfigError, build_experts, find_config, load_config
from shared.models import Checkpoint, Event, Expert, Job, ToolCall
from shared.store import JobStore, StoreError

# jobs read per page of the history: the first paint reads this many records, whatever the store holds
PAGE = 100
STATUS_WIDTH = 24


@dataclass
class Jobs:
    jobs: list[Job]
    total: int  # jobs in the store, read or not
    problems: list[str] = field(default_factory=list)


def history(store: JobStore, limit: int = PAGE) -> Jobs:
    """The newest `limit` jobs, from the store's newest-first index (as `perq status`)."""
    try:
        listing = store.list_jobs(limit=limit)
    except (OSError, ValueError) as e:
        return Jobs([], 0, [f"cannot read the store: {e}"])
    return Jobs(listing.jobs, listing.total, listing.problems)


def job_label(job: Job) -> Text:
    """`status  expertKey - N steps (jobId) (startedAt)`, as `perq status` lists jobs."""
    status = (job.status.ljust(STATUS_WIDTH), STATUS_STYLE.get(job.status, ""))
    return Text.assemble(status, " ", job_line(job))


@dataclass
class Checkpoints:
    checkpoints: list[Checkpoint]  # newest first
    problems: list[str] = field(default_factory=list)


def checkpoints(store: JobStore, job_id: str) -> Checkpoints:
    """A job's checkpoints, newest (highest step) first, delegates' included."""
    try:
        found, problems = store.list_checkpoints(job_id)
    except (OSError, ValueError) as e:
        return Checkpoints([], [f"cannot read the checkpoints of job {job_id}: {e}"])
    return Checkpoints(list(reversed(found)), problems)


def checkpoint_label(cp: Checkpoint) -> Text:
    """`Step N (checkpointId)`, then whose step it was and how it ended."""
    return Text.assemble(
        checkpoint_line(cp),
        ("  " + cp.expert.key, "blue"),
        ("  (delegate)" if cp.delegated_by else "", "dim"),
        ("  " + cp.status, "dim"),
    )


@dataclass
class Events:
    events: list[Event]
    problems: list[str] = field(default_factory=list)


def checkpoint_events(store: JobStore, cp: Checkpoint) -> Events:
    """The events of the checkpoint's run up to its step: how the run got to this checkpoint."""
    problems: list[str] = []
    try:
        events = run_events(store, cp.job_id, cp.run_id, problems)
    except (OSError, ValueError) as e:
        return Events([], [f"cannot read the events of run {cp.run_id}: {e}"])
    shown = [e for e in events if e.step_number is None or e.step_number <= cp.step_number]
    return Events(shown, problems)


def event_label(event: Event) -> Text:
    """One line per event: `perq log`'s `[Step n] type  HH:MM:SS  expert`, then its details."""
    header = event_lines(event)[0]
    details = event_details(event)
    if details:
        header.append("  " + " · ".join(details))
    return header


def event_json(event: Event) -> str:
    return json.dumps(event.to_dict(), indent=2, ensure_ascii=False)


def load_job(store: JobStore, job_id: str) -> tuple[Job | None, str | None]:
    """The job record, or None and why it could not be read."""
    try:
        job = store.load_job(job_id)
    except (StoreError, ValueError, OSError) as e:
        return None, str(e)
    return (job, None) if job is not None else (None, f"job {job_id} not found")


def waiting_call(store: JobStore, job: Job) -> ToolCall | None:
    """The interactive tool call a stopped job waits on (the one `-i` answers), if any."""
    if job.status != "stoppedByInteractiveTool" or job.head_checkpoint_id is None:
        return None
    try:
        head = store.load_checkpoint(job.id, job.head_checkpoint_id)
    except (StoreError, ValueError, OSError):
        return None
    if head is None or head.status != "stoppedByInteractiveTool" or not head.pending_tool_calls:
        return None
    return head.pending_tool_calls[0]


def question(call: ToolCall) -> str:
    """How a waiting tool call is put to the person who answers it."""
    return f"{call.tool_name} {json.dumps(call.args, ensure_ascii=False)}"


@dataclass
class Experts:
    experts: dict[str, Expert]
    config_path: Path | None
    problem: str | None = None


def experts(config: str | None, cwd: Path) -> Experts:
    """The experts of perstack.toml (the one `--config` names, else the nearest upward from `cwd`)."""
    try:
        path = find_config(config, cwd)
        if path is None:
            return Experts({}, None, f"no perstack.toml found in {cwd} or its parents (use --config)")
        return Experts(build_experts(load_config(path)), path)
    except (ConfigError, OSError, ValueError) as e:
        return Experts({}, None, str(e))


def expert_label(expert: Expert) -> Text:
    return Text.assemble((expert.key, "bold"), ("  " + (expert.description or ""), "dim"))
