"""`perq worker --processes N`: one process that keeps N worker processes running on this machine.

A worker process is one event loop, and the Python of its steps is CPU-bound, so one process uses one
core however many steps it holds. The supervisor runs no steps and opens no Redis connection: it starts N
children (each a `perq worker --processes 1`, with its own heartbeat and leases), starts again one that
dies (after a delay that doubles while a child keeps dying young, so a broken setting does not spin), and
on SIGTERM or SIGINT passes the signal to every child and waits until each has drained as a lone worker
does: its steps finished within the grace period, the rest handed back to the queue.

Children run in their own process group, so a Ctrl-C at a terminal reaches them once (through the
supervisor), not twice; and they are told to stop with SIGTERM if the supervisor itself dies, so a killed
supervisor leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("perq.supervisor")
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
# a child that ran this long before it died was healthy: its restart starts again from the first delay
HEALTHY_AFTER_S = 30.0
# how often the supervisor looks at its children; it does nothing else, so this costs nothing
LOOK_EVERY_S = 0.1
PR_SET_PDEATHSIG = 1


def default_processes() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass
class Child:
    """One slot of the supervisor: the process in it now, and how its recent lives went."""

    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    short_lives: int = 0  # deaths in a row, each before HEALTHY_AFTER_S
    restart_at: float | None = None
    finished: bool = False  # a burst child that found the queue empty and exited 0


class Supervisor:
    def __init__(self, processes: int, child_args: list[str], *, burst: bool = False) -> None:
        self.children = [Child(slot=i) for i in range(processes)]
        self.argv = [sys.executable, "-m", "producer", "worker", "--processes", "1", *child_args]
        self.burst = burst
        self.stopping: int | None = None  # the signal that asked us to stop
        self.failed = False
        self._die_with_parent = _parent_death_signal()

    def run(self) -> int:
        """Supervise until stopped by a signal (or, in burst mode, until every child is done); exit status."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("supervising %d worker processes", len(self.children))
            for child in self.children:
                self._start(child)
            while not self._done():
                self._look()
                time.sleep(LOOK_EVERY_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 1 if self.failed else 0

    # --- children -----------------------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        child.proc = subprocess.Popen(self.argv, process_group=0, preexec_fn=self._die_with_parent)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("worker process %d started (pid %d)", child.slot, child.proc.pid)
        if self.stopping is not None:  # the signal came while this child was being started: pass it on too
            child.proc.send_signal(self.stopping)

    def _look(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and (code := child.proc.poll()) is not None:
                self._ended(child, code, now)
            if child.restart_at is not None and now >= child.restart_at and self.stopping is None:
                self._start(child)

    def _ended(self, child: Child, code: int, now: float) -> None:
        pid = child.proc.pid if child.proc else 0
        child.proc = None
        if self.stopping is not None:
            if code != 0:
                self.failed = True
                log.warning("worker process %d (pid %d) exited with %d while stopping", child.slot, pid, code)
            return
        if self.burst and code == 0:
            child.finished = True
            return
        lived = now - child.started_at
        child.short_lives = 0 if lived >= HEALTHY_AFTER_S else child.short_lives + 1
        delay = min(RESTART_DELAY_S * 2 ** max(child.short_lives - 1, 0), RESTART_DELAY_MAX_S)
        child.restart_at = now + delay
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        log.warning(
            "worker process %d (pid %d) %s after %.1f s; restarting it in %.1f s",
            child.slot,
            pid,
            how,
            lived,
            delay,
        )

    def _done(self) -> bool:
        if any(c.proc is not None for c in self.children):
            return False
        if self.stopping is not None:
            return True
        return all(c.finished for c in self.children)

    # --- signals ------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            log.info("%s: stopping %d worker processes", signal.Signals(signum).name, len(self.children))
        self.stopping = signum
        for child in self.children:
            child.restart_at = None
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)


def _parent_death_signal() -> Callable[[], None] | None:
    """A function for Popen's preexec_fn: the child gets SIGTERM when the supervisor dies (Linux only)."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os._exit(1)

    return arm
