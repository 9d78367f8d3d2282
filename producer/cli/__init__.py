"""The `perq` command line: the typer app, the commands it holds (one module each in this package), and
`main`, the console script.

Every command imports what it needs inside its function, and this package imports only typer at load, so
that `perq --help` starts at once (no model SDK, MCP, pydantic, arq, Redis or Textual).
"""

from __future__ import annotations

import typer

from producer.cli import cancel, export, log, recover, run, start, status, worker
from producer.cli.exit import ExitCode

app = typer.Typer(
    name="perq",
    help="Run Perstack experts as durable background jobs on arq workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help and errors: typer's rich formatter imports ~70 ms of rich modules (markdown, syntax,
    # traceback) into every `perq --help` and every bad-usage error
    rich_markup_mode=None,
)

# in the order `perq --help` lists them
for command in (
    run.run,
    status.status,
    cancel.cancel,
    export.export,
    worker.worker,
    recover.recover,
    log.log,
    start.start,
):
    app.command()(command)


def main() -> None:
    """The console script: whatever escapes a command becomes one line on stderr, never a traceback."""
    # `say` and pydantic are imported only when something went wrong: `perq --help` must not pay for them
    try:
        app()
    except (OSError, RuntimeError) as e:
        from producer.views.terminal import say

        say(str(e))
        raise SystemExit(ExitCode.FAILED) from None
    except Exception as e:
        from pydantic import ValidationError

        from producer.views.terminal import say
        from shared.config import ConfigError

        if isinstance(e, ValidationError):
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            e = ConfigError(f"{where}: {first['msg']}" if where else first["msg"])
        if not isinstance(e, ConfigError):  # ConfigError: e.g. a PERQ_* setting that does not parse
            raise
        say(str(e))
        raise SystemExit(ExitCode.BAD_INPUT) from None
