"""The options `perq run` and `perq start` share, declared once: both take a run's settings the same way.

Each is an `Annotated` type a command uses as its parameter's type; the default stays at the parameter.
Only typer is imported, so `perq --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

Config = Annotated[str | None, typer.Option(help="Path to perstack.toml (default: search upward)")]
Provider = Annotated[str | None, typer.Option(help="anthropic, openai, ollama, deepseek, script, ...")]
Model = Annotated[str | None, typer.Option(help="Model name; for --provider script, the script file")]
MaxSteps = Annotated[int | None, typer.Option(help="Job-wide step limit (default 100)")]
MaxRetries = Annotated[int | None, typer.Option(help="Failed generations allowed in a row (default 5)")]
Timeout = Annotated[int | None, typer.Option(help="Per-generation timeout in ms (default 300000)")]
ReasoningBudget = Annotated[str | None, typer.Option(help="none, minimal, low, medium, high or tokens")]
Workspace = Annotated[str | None, typer.Option(help="Directory the file tools work in (default .)")]
ContinueLatest = Annotated[bool, typer.Option("--continue", help="Continue the latest job")]
ContinueJob = Annotated[str | None, typer.Option(help="Continue this job from its head checkpoint")]
ResumeFrom = Annotated[str | None, typer.Option(help="Branch from this checkpoint (needs --continue-job)")]
Interactive = Annotated[
    bool, typer.Option("-i", "--interactive-tool-call-result", help="QUERY answers the waiting tool call")
]
