"""Where perq's output goes: the rich console of a view, a JSON document on stdout, a `perq:` line on stderr.

Every command and view writes through these three, so that output looks the same from one command to the
next (no highlighting, long lines never cut) and problems always reach stderr in the same form.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def console(*, stderr: bool = False, soft_wrap: bool = True) -> Console:
    """A console that prints text as it is: no guessed highlighting, and (unless `soft_wrap` is False, as a
    view redrawn in place needs) long lines never wrapped, so that a line can be searched for whole."""
    from rich.console import Console  # here: `say` serves the first lines of `perq`, before any view

    return Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap)


def say(message: str) -> None:
    """One line on stderr, `perq: message`: what went wrong, or what a follower had to do instead."""
    print(f"perq: {message}", file=sys.stderr)


def skipped(problems: list[str]) -> None:
    """The records a command passed over because the store could not read them."""
    for problem in problems:
        say(f"skipped {problem}")


def print_json(data: Any, *, indent: int | None = 2) -> None:
    print(json.dumps(data, indent=indent))
