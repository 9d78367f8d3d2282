"""The worker: arq processes that run one step of an expert's loop per queue job (`main` starts them,
`queue/` talks to Redis, `runtime` runs a step, `loop` is the loop's states, `models/` and `skills/` what
a step calls)."""
