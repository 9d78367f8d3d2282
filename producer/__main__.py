"""`python -m producer`: the `perq` command, for environments without the console script on PATH."""

from producer.cli import main

main()
