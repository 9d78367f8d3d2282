"""The `perq start` command: `perq run`'s options, checked for Textual, handed to the app.

Imports only typer at load (the CLI registers it at start-up); Textual is imported when the command runs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def start(
    expert_key: Annotated[
        str | None, typer.Argument(help="Expert to run; without a query, the UI asks for one")
    ] = None,
    query: Annotated[
        str | None, typer.Argument(help="The query: given with EXPERT, the run starts at once")
    ] = None,
    config: Annotated[str | None, typer.Option(help="Path to perstack.toml (default: search upward)")] = None,
    provider: Annotated[
        str | None, typer.Option(help="anthropic, openai, ollama, deepseek, script, ...")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name; for --provider script, the script file")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Job-wide step limit (default 100)")] = None,
    max_retries: Annotated[
        int | None, typer.Option(help="Failed generations allowed in a row (default 5)")
    ] = None,
    timeout: Annotated[int | None, typer.Option(help="Per-generation timeout in ms (default 300000)")] = None,
    reasoning_budget: Annotated[
        str | None, typer.Option(help="none, minimal, low, medium, high or tokens")
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Id for the new job the first run makes")] = None,
    workspace: Annotated[
        str | None, typer.Option(help="Directory the file tools work in (default .)")
    ] = None,
    continue_latest: Annotated[bool, typer.Option("--continue", help="Continue the latest job")] = False,
    continue_job: Annotated[
        str | None, typer.Option(help="Continue this job from its head checkpoint")
    ] = None,
    resume_from: Annotated[
        str | None, typer.Option(help="Branch from this checkpoint (needs --continue-job)")
    ] = None,
    interactive: Annotated[
        bool, typer.Option("-i", "--interactive-tool-call-result", help="QUERY answers the waiting tool call")
    ] = False,
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
