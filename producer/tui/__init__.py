"""`perq start`: the interactive terminal UI over the job store and the live event stream (Textual).

Kept apart from `producer/cli/` because it is the one part of the producer that needs Textual: the
command (`producer/cli/start.py`) registers with typer alone, and the app (`app.py`) is imported when
`perq start` runs, so `perq --help` never loads Textual.
"""
