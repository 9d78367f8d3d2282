"""perq's producer side: what enqueues jobs and reads them back (`api`, the `perq` command line in `cli/`,
its output in `views/`, following a running job in `follow`, `perq log`'s selection in `log_query`, `perq
export`'s layout in `export`, the terminal UI in `tui/`). Workers live in `worker/`; both share `shared/`."""
