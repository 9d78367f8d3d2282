"""How the CLI shows things on a terminal (rich) and as JSON: one module per thing shown.

`status` (jobs and checkpoints), `log` (events), `queue` (the queue's counts), `watch` (those views kept
current), `progress` (a job followed while it runs: the one spinner), `report` (what a command that changed
something prints), `clock` (the one way to write a time), `terminal` (where output goes).
"""
