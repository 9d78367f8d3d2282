"""Processes as /proc shows them: what tests that stop, kill or count processes look at."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str  # the command's name, as the kernel keeps it (15 characters at most)
    state: str  # R running, S sleeping, T stopped, Z zombie, ...
    ppid: int


def proc_stat(pid: int) -> ProcStat | None:
    """One process's /proc/PID/stat, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split at its last ')'
    head, _, tail = text.rpartition(")")
    state, ppid = tail.split()[:2]
    return ProcStat(pid, head.split("(", 1)[1], state, int(ppid))


def processes() -> Iterator[ProcStat]:
    """Every process this one can see (one that ends while it is read is left out)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := proc_stat(int(entry.name))) is not None:
            yield found
