"""`perq start`: the interactive terminal UI over the job store and the live event stream (Textual).

Nothing in this package imports Textual at load: `command.py` registers the command with typer alone, and
the app (`app.py`) is imported when `perq start` runs, so `perq --help` stays as fast as before.
"""
