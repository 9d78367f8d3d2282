"""The options `perq run` and `perq start` share, declared once: both take a run's settings the same way.

Each option is named as the `RunRequest` field it fills; `run_options` gives a command all of them after its
arguments and hands them over as one dict, so that an option added here reaches both commands and the
request. Only typer and the standard library are imported at load, so `perq --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.models import ArgumentInfo

Config = Annotated[str | None, typer.Option(help="Path to perstack.toml (default: search upward)")]
Provider = Annotated[str | None, typer.Option(help="anthropic, openai, ollama, deepseek, script, ...")]
Model = Annotated[str | None, typer.Option(help="Model name; for --provider script, the script file")]
MaxSteps = Annotated[int | None, typer.Option(help="Job-wide step limit (default 100)")]
MaxRetries = Annotated[int | None, typer.Option(help="Failed generations allowed in a row (default 5)")]
Timeout = Annotated[int | None, typer.Option(help="Per-generation timeout in ms (default 300000)")]
ReasoningBudget = Annotated[str | None, typer.Option(help="none, minimal, low, medium, high or tokens")]
JobId = Annotated[str | None, typer.Option(help="Id for a new job")]
Workspace = Annotated[str | None, typer.Option(help="Directory the file tools work in (default .)")]
ContinueLatest = Annotated[bool, typer.Option("--continue", help="Continue the latest job")]
ContinueJob = Annotated[str | None, typer.Option(help="Continue this job from its head checkpoint")]
ResumeFrom = Annotated[str | None, typer.Option(help="Branch from this checkpoint (needs --continue-job)")]
Interactive = Annotated[
    bool, typer.Option("-i", "--interactive-tool-call-result", help="QUERY answers the waiting tool call")
]

# (RunRequest field, option, default), in the order `--help` lists them
_SHARED: list[tuple[str, Any, Any]] = [
    ("config", Config, None),
    ("provider", Provider, None),
    ("model", Model, None),
    ("max_steps", MaxSteps, None),
    ("max_retries", MaxRetries, None),
    ("timeout", Timeout, None),
    ("reasoning_budget", ReasoningBudget, None),
    ("job_id", JobId, None),
    ("workspace", Workspace, None),
    ("continue_latest", ContinueLatest, False),
    ("continue_job", ContinueJob, None),
    ("resume_from", ResumeFrom, None),
    ("interactive", Interactive, False),
]


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the run options, listed after its arguments; it receives their values as `options`,
    a dict of `RunRequest` fields (`RunRequest(expert_key=..., query=..., **options)`).

    Typer reads a command's parameters from its signature, so the command typer sees is a wrapper whose
    signature is the command's own without `options`, with the shared options put in.
    """
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
    arguments = [
        p for p in own if any(isinstance(m, ArgumentInfo) for m in getattr(p.annotation, "__metadata__", ()))
    ]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=default)
        for name, option, default in _SHARED
    ]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in arguments]

    @functools.wraps(command)
    def with_options(*args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name, _, _ in _SHARED}
        command(*args, **kwargs, options=options)

    with_options.__signature__ = inspect.Signature([*arguments, *shared, *rest])  # type: ignore[attr-defined]
    return with_options
