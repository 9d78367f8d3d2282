"""The options `perq run` and `perq start` share, declared once: both take a run's settings the same way.

Each option is named as the `RunRequest` field it fills; `run_options` gives a command all of them after its
arguments and hands them over as one dict, so that an option added here reaches both commands and the
request. Only typer and the standard library are imported at load, so `perq --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, get_args

import typer
from typer.models import ArgumentInfo


class _Shared:
    """The run options, in the order `--help` lists them, each named as the `RunRequest` field it fills."""

    config = Annotated[str | None, typer.Option(help="Path to perstack.toml (default: search upward)")]
    provider = Annotated[str | None, typer.Option(help="anthropic, openai, ollama, deepseek, script, ...")]
    model = Annotated[str | None, typer.Option(help="Model name; for --provider script, the script file")]
    max_steps = Annotated[int | None, typer.Option(help="Job-wide step limit (default 100)")]
    max_retries = Annotated[int | None, typer.Option(help="Failed generations allowed in a row (default 5)")]
    timeout = Annotated[int | None, typer.Option(help="Per-generation timeout in ms (default 300000)")]
    reasoning_budget = Annotated[str | None, typer.Option(help="none, minimal, low, medium, high or tokens")]
    job_id = Annotated[str | None, typer.Option(help="Id for a new job")]
    workspace = Annotated[str | None, typer.Option(help="Directory the file tools work in (default .)")]
    continue_latest = Annotated[bool, typer.Option("--continue", help="Continue the latest job")]
    continue_job = Annotated[str | None, typer.Option(help="Continue this job from its head checkpoint")]
    resume_from = Annotated[
        str | None, typer.Option(help="Branch from this checkpoint (needs --continue-job)")
    ]
    interactive = Annotated[
        bool, typer.Option("-i", "--interactive-tool-call-result", help="QUERY answers the waiting tool call")
    ]


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the run options, listed after its arguments; it receives their values as `options`,
    a dict of `RunRequest` fields (`RunRequest(expert_key=..., query=..., **options)`).

    Typer reads a command's parameters from its signature, so the command typer sees is a wrapper whose
    signature is the command's own without `options`, with the shared options put in.
    """
    shared = {
        name: inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=option,
            # a flag is off unless given; any other option is None, so that the request's default applies
            default=False if get_args(option)[0] is bool else None,
        )
        for name, option in vars(_Shared).items()
        if not name.startswith("_")
    }
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
    arguments = [p for p in own if _is_argument(p)]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if not _is_argument(p)]

    @functools.wraps(command)
    def with_options(*args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in shared}
        command(*args, **kwargs, options=options)

    with_options.__signature__ = inspect.Signature([*arguments, *shared.values(), *rest])  # type: ignore[attr-defined]
    return with_options


def _is_argument(parameter: inspect.Parameter) -> bool:
    """A positional argument of the command (`typer.Argument`), as opposed to an option."""
    return any(isinstance(m, ArgumentInfo) for m in getattr(parameter.annotation, "__metadata__", ()))
