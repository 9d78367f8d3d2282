"""The `perq start` command: `perq run`'s options, checked for Textual, handed to the app.

Imports only typer at load (the CLI registers it at start-up); Textual is imported when the command runs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from producer.cli import options as opt


def start(
    expert_key: Annotated[
        str | None, typer.Argument(help="Expert to run; without a query, the UI asks for one")
    ] = None,
    query: Annotated[
        str | None, typer.Argument(help="The query: given with EXPERT, the run starts at once")
    ] = None,
    config: opt.Config = None,
    provider: opt.Provider = None,
    model: opt.Model = None,
    max_steps: opt.MaxSteps = None,
    max_retries: opt.MaxRetries = None,
    timeout: opt.Timeout = None,
    reasoning_budget: opt.ReasoningBudget = None,
    job_id: Annotated[str | None, typer.Option(help="Id for the new job the first run makes")] = None,
    workspace: opt.Workspace = None,
    continue_latest: opt.ContinueLatest = False,
    continue_job: opt.ContinueJob = None,
    resume_from: opt.ResumeFrom = None,
    interactive: opt.Interactive = False,
) -> None:
    """The terminal UI: browse jobs, checkpoints and events; start, follow, answer, resume and cancel runs."""
    try:
        import textual  # noqa: F401
    except ImportError:
        print("perq: perq start needs Textual: pip install 'perq[tui]'", file=sys.stderr)
        raise typer.Exit(1) from None
    from producer.api import RunRequest
    from producer.tui.app import run_app

    request = RunRequest(
        expert_key=expert_key or "",
        query=query or "",
        config=config,
        provider=provider,
        model=model,
        max_steps=max_steps,
        max_retries=max_retries,
        timeout=timeout,
        reasoning_budget=reasoning_budget,
        job_id=job_id,
        workspace=workspace,
        continue_latest=continue_latest,
        continue_job=continue_job,
        resume_from=resume_from,
        interactive=interactive,
    )
    raise typer.Exit(run_app(request))
