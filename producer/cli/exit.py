"""perq's exit codes, and the one way a command gives up: a `perq: ...` line on stderr and its code.

Kept apart from the commands so that every command, and `main`, speaks the same numbers; scripts and tests
branch on them, so a code's number never changes. Only the standard library and typer are imported at
load: the errors a command maps to codes are imported when it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import NoReturn

import typer


class ExitCode(IntEnum):
    """How a `perq` command ended."""

    OK = 0
    # the job stopped by an error or was cancelled; Redis unreachable; an unknown --checkpoint; Textual
    # missing for `perq start`; an operating-system error
    FAILED = 1
    # bad input (a refused request, an unknown job, a bad filter, an invalid PERQ_* setting), and click's
    # usage errors: nothing was written
    BAD_INPUT = 2
    WAITING_FOR_INPUT = 3  # the job stopped on an interactive tool: `perq run -i` answers it
    MAX_STEPS = 4  # the job reached its step limit
    INTERRUPTED = 130  # Ctrl-C while following a job, as a shell reports SIGINT

    @classmethod
    def of_status(cls, status: str) -> ExitCode:
        """The code `perq run --wait` and `perq log --follow` exit with for a job's final status."""
        return _BY_STATUS.get(status, cls.FAILED)


_BY_STATUS = {
    "completed": ExitCode.OK,
    "stoppedByInteractiveTool": ExitCode.WAITING_FOR_INPUT,
    "stoppedByMaxSteps": ExitCode.MAX_STEPS,
    "stoppedByError": ExitCode.FAILED,
    "cancelled": ExitCode.FAILED,
}


def fail(message: str, code: ExitCode) -> NoReturn:
    """End the command: `message` as one line on stderr, then exit with `code`."""
    from producer.views.terminal import say

    say(message)
    raise typer.Exit(code)


@contextmanager
def exits_on_refusal() -> Iterator[None]:
    """End the command on a refused request: bad input exits 2, an unreachable Redis exits 1.

    Bad input is what `producer.api` refuses (`RequestError`, a `ConfigError`), an id or value that does not
    parse (`ValueError`) and a record the store cannot read (`StoreError`).
    """
    from producer.api import QueueUnavailable
    from shared.config import ConfigError
    from shared.store import StoreError

    try:
        yield
    except QueueUnavailable as e:
        fail(str(e), ExitCode.FAILED)
    except (ConfigError, ValueError, StoreError) as e:
        fail(str(e), ExitCode.BAD_INPUT)
