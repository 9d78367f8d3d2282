"""`perq start`: `perq run`'s options, checked for Textual, handed to the terminal UI (`producer.tui`).

Imports only typer at load (the CLI registers it at start-up); Textual is imported when the command runs.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from producer.cli import options as opt
from producer.cli.exit import ExitCode, fail


@opt.run_options
def start(
    expert_key: Annotated[
        str | None, typer.Argument(help="Expert to run; without a query, the UI asks for one")
    ] = None,
    query: Annotated[
        str | None, typer.Argument(help="The query: given with EXPERT, the run starts at once")
    ] = None,
    *,
    options: dict[str, Any],
) -> None:
    """The terminal UI: browse jobs, checkpoints and events; start, follow, answer, resume and cancel runs."""
    try:
        import textual  # noqa: F401
    except ImportError:
        fail("perq start needs Textual: pip install 'perq[tui]'", ExitCode.FAILED)
    from producer.api import RunRequest
    from producer.tui.app import run_app

    raise typer.Exit(run_app(RunRequest(expert_key=expert_key or "", query=query or "", **options)))
