"""How `perq log` looks: Perstack's terminal layout in colour (rich), or its JSON form.

One event is a `[Step n] type  HH:MM:SS` line followed by indented details; `perq log --follow` prints
events the same way as they happen.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from producer.log_query import DELEGATION_TYPES, ERROR_TYPES, TOOL_TYPES, LogFilters, LogOutput
from producer.views.clock import time_of_day, timestamp
from producer.views.status import STATUS_STYLE
from producer.views.terminal import skipped
from shared.models import (
    CallDelegate,
    CallInteractiveTool,
    CallTools,
    Checkpoint,
    CompleteRun,
    Event,
    Job,
    ResolveToolResults,
    Retry,
    StartRun,
    StopRunByError,
    ToolResultPart,
    UserMessage,
    first_text,
)

RULE = "─" * 50
TYPE_WIDTH = 24


def render_json(output: LogOutput, *, pretty: bool) -> str:
    return json.dumps(output.to_dict(), indent=2 if pretty else None, ensure_ascii=False)


def print_log(
    out: Console, output: LogOutput, *, verbose: bool = False, messages: bool = False, summary: bool = False
) -> None:
    if output.is_latest_job:
        out.print("(showing latest job)\n")
    out.print(Text(f"Storage: {output.storage_path}\n"))
    for line in job_header(output.job):
        out.print(line)
    out.print()
    if output.checkpoint is not None:
        for line in checkpoint_header(output.checkpoint, messages=messages):
            out.print(line)
        out.print()
    if summary:
        for line in summary_lines(output.summary):
            out.print(line)
        out.print()
    if output.events:
        out.print("Events:")
        out.print(RULE)
        for event in output.events:
            print_event(out, event, verbose=verbose)
        out.print(RULE)
        total, shown = output.total_before_pagination, output.matched_after_pagination
        if total > shown:
            extra = len(output.events) - shown
            context = f" (+{extra} context)" if extra > 0 else ""
            out.print(f"(showing {shown} of {total} matched events{context})")
            out.print("Use --take and --offset to paginate, or --take 0 for all")
    elif output.total_before_pagination > 0:
        out.print(f"({output.total_before_pagination} events available, use --offset to view)")


def job_header(job: Job) -> list[Text]:
    lines = [
        Text.assemble("Job: ", (job.id, "bold"), " (", (job.status, STATUS_STYLE.get(job.status, "")), ")"),
        Text(f"Expert: {job.coordinator_expert_key}"),
        Text(f"Started: {timestamp(job.started_at)}"),
        Text(f"Steps: {job.total_steps}"),
    ]
    if job.finished_at:
        lines.append(Text(f"Finished: {timestamp(job.finished_at)}"))
    return lines


def checkpoint_header(cp: Checkpoint, *, messages: bool) -> list[Text]:
    lines = [
        Text.assemble("Checkpoint: ", (cp.id, "bold")),
        Text(f"Status: {cp.status}"),
        Text(f"Step: {cp.step_number}"),
        Text(f"Expert: {cp.expert.key}"),
    ]
    if messages:
        lines += [Text(""), Text("Messages:")]
        for message in cp.messages:
            lines.append(Text(f"  [{message.type}] {preview(first_text(message.contents), 100)}"))
    return lines


def summary_lines(summary: dict[str, Any]) -> list[Text]:
    lines = [
        Text("Summary:"),
        Text(f"  Total Events: {summary['totalEvents']}"),
        Text(f"  Errors: {summary['errorCount']}"),
        Text(f"  Tool Calls: {summary['toolCallCount']}"),
        Text(f"  Delegations: {summary['delegationCount']}"),
    ]
    if "stepRange" in summary:
        lines.append(Text(f"  Step Range: {summary['stepRange']['min']} - {summary['stepRange']['max']}"))
    return lines


def print_output(
    out: Console,
    output: LogOutput | None,
    *,
    json_output: bool,
    pretty: bool,
    verbose: bool,
    messages: bool,
    summary: bool,
) -> None:
    """What `perq log` prints for a selection: `No data found`, its JSON, or its terminal layout."""
    if output is None:
        print("No data found")
        return
    skipped(output.problems)
    if json_output:
        print(render_json(output, pretty=pretty))
    else:
        print_log(out, output, verbose=verbose, messages=messages, summary=summary)


def live_printer(
    out: Console, filters: LogFilters, *, verbose: bool, json_output: bool
) -> Callable[[Event], None]:
    """How `perq log --follow` prints an event as it happens: the events its filters match, as `perq log`
    shows them or as JSON lines, each flushed at once so that a reader of the pipe sees it."""

    def show(event: Event) -> None:
        if not filters.matches(event):
            return
        if json_output:
            print(event.to_json())
        else:
            print_event(out, event, verbose=verbose)
        sys.stdout.flush()

    return show


# --- one event ------------------------------------------------------------------------------------


def print_event(out: Console, event: Event, *, verbose: bool = False) -> None:
    for line in event_lines(event, verbose=verbose):
        out.print(line)


def event_lines(event: Event, *, verbose: bool = False) -> list[Text]:
    step = "-" if event.step_number is None else str(event.step_number)
    header = Text.assemble(
        (f"[Step {step}] ", "dim"),
        (event.type.ljust(TYPE_WIDTH), _type_style(event.type)),
        (time_of_day(event.timestamp), "dim"),
        (f"  {event.expert_key}" if event.expert_key else "", "blue"),  # perq: whose run, with delegates
    )
    return [header, *(Text("  " + d) for d in event_details(event, verbose=verbose)), Text("")]


def event_details(event: Event, *, verbose: bool = False) -> list[str]:
    """The lines under an event's header: what a person wants to know about it."""
    lines: list[str] = []
    if isinstance(event, StartRun):
        user = next((m for m in event.input_messages if isinstance(m, UserMessage)), None)
        if user is not None:
            lines.append(f'Query: "{preview(first_text(user.contents), 60)}"')
    elif isinstance(event, CallTools):
        if verbose:
            for call in event.tool_calls:
                lines.append(f"[{call.skill_name}] {call.tool_name}")
                lines.append(f"  Args: {json.dumps(call.args, ensure_ascii=False)}")
        else:
            lines.append("Tools: " + ", ".join(c.tool_name for c in event.tool_calls))
    elif isinstance(event, ResolveToolResults):
        for result in event.tool_results:
            text = first_text(result.result)
            failed = text.lower().startswith("error") or any(
                isinstance(p, ToolResultPart) and p.is_error for p in result.result
            )
            lines.append(f"{'✗' if failed else '✓'} {result.tool_name}: {preview(text, 40)}")
    elif isinstance(event, CallInteractiveTool):
        call = event.tool_call
        lines.append(f"Waiting for: {call.tool_name} {json.dumps(call.args)}")
    elif isinstance(event, StopRunByError):
        error = event.run_error
        if error is not None:
            lines.append(f"Error: {error.name}")
            lines.append(f"Message: {error.message}")
            lines.append(f"Retryable: {str(error.is_retryable).lower()}")
    elif isinstance(event, CallDelegate):
        for call in event.calls:
            target = call.args.get("expertKey") or call.args.get("expert") or call.tool_name
            lines.append(f"Delegate to: {target}")
    elif isinstance(event, CompleteRun):
        lines.append(f"Result: {preview(event.text, 80)}")
    elif isinstance(event, Retry):
        lines.append(f"Reason: {event.reason}")
    return lines


# --- small helpers --------------------------------------------------------------------------------


def preview(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width] + "..."


def _type_style(kind: str) -> str:
    if kind in ERROR_TYPES:
        return "bold red"
    if kind in TOOL_TYPES:
        return "cyan"
    if kind in DELEGATION_TYPES:
        return "magenta"
    if kind == "completeRun":
        return "bold green"
    return "bold"
