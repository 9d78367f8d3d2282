"""Group flushes: many threads that each need their writes on the disk share one flush of the file system.

A flush (fsync) costs a disk round trip, milliseconds on many disks whatever was written, and a step
needs its data on the disk before its commit and its commit before it hands on. Flushing each file on its
own makes a worker of hundreds of concurrent steps wait on thousands of flushes; here a thread that needs
its writes durable asks for a flush, and one `syncfs` of the store's file system serves every thread that
asked before it started (the way databases group their commits). Where `syncfs` is missing (not Linux),
each file is flushed on its own, as callers pass them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def libc_function(name: str) -> Callable[..., int] | None:
    """A function of the C library that Python's os module lacks (syncfs, renameat2), called with errno
    kept; None where the system has none (not Linux, an older libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function: Callable[..., int] = getattr(libc, name)
    except (OSError, AttributeError, TypeError):
        return None
    return function


_SYNCFS = libc_function("syncfs")
# how far a file's ctime may trail the clock that stamps flushes (the kernel's coarse clock: one tick)
_STAMP_SLACK_NS = 50_000_000


class GroupFlush:
    """Flushes of the file system holding `root`, shared by the threads that ask at the same time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cond = threading.Condition()
        self._asked = 0  # flushes asked for so far
        self._done = 0  # every ask up to this one is on the disk
        self._running = False
        self._covered_ns = 0  # the wall-clock start of the latest flush done: all before it is on the disk

    @property
    def grouped(self) -> bool:
        return _SYNCFS is not None

    def flush(self, fds: Sequence[int] = ()) -> None:
        """Return once everything written before the call is on the disk. `fds`: the files written, for
        systems without syncfs (flushed one by one there)."""
        if _SYNCFS is None:
            for fd in fds:
                os.fsync(fd)
            return
        with self._cond:
            self._asked += 1
            mine = self._asked
            while self._done < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covered = self._asked  # every ask so far wrote before this flush starts
                started = time.time_ns()
                self._cond.release()
                flushed = False
                try:
                    self._syncfs()
                    flushed = True
                finally:  # a failed flush covers nobody: a waiting thread tries again, or fails in turn
                    self._cond.acquire()
                    self._running = False
                    if flushed:
                        self._done = max(self._done, covered)
                        self._covered_ns = max(self._covered_ns, started)
                    self._cond.notify_all()

    def covers(self, changed_ns: int) -> bool:
        """Whether a change the file system stamped at `changed_ns` (a ctime) is on the disk: a flush of the
        whole file system (syncfs) begun after it is done, in this process. Stamps come from the kernel's
        coarse clock, up to a tick behind this one: `_STAMP_SLACK_NS` makes up for it."""
        return self.grouped and changed_ns + _STAMP_SLACK_NS < self._covered_ns

    def _syncfs(self) -> None:
        assert _SYNCFS is not None
        existing = self.root
        while not existing.exists() and existing != existing.parent:  # the store's folder may be new
            existing = existing.parent
        fd = os.open(existing, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
        finally:
            os.close(fd)


class LoopFlush:
    """`GroupFlush` for the steps of one event loop: a step awaits a flush; one flush, run on one thread of
    its own, serves every step that asked before it started, and the steps that ask while it runs share the
    next. The loop never waits, and no thread but the flusher's takes part: a worker's steps write on the
    loop, where a thread per waiting step would pass the GIL back and forth at each of their writes."""

    def __init__(self, group: GroupFlush) -> None:
        self._group = group
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="perq-flush")
        self._asking: list[asyncio.Future[None]] = []  # steps waiting for the next flush to start
        self._running = False

    async def flush(self) -> None:
        """Return once everything written before the call is on the disk."""
        asked = asyncio.get_running_loop().create_future()
        self._asking.append(asked)
        if not self._running:
            self._start()
        await asked

    def _start(self) -> None:
        self._running = True
        covered, self._asking = self._asking, []
        loop = asyncio.get_running_loop()
        try:
            self._thread.submit(self._flush_then_tell, loop, covered)
        except BaseException as e:  # the flusher is closed (shutdown): its steps fail instead of waiting
            self._running = False
            for asked in covered:
                if not asked.done():
                    asked.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            raise

    def _flush_then_tell(self, loop: asyncio.AbstractEventLoop, covered: list[asyncio.Future[None]]) -> None:
        """On the flusher's thread: flush, then hand the outcome to the loop in one callback. Why not
        `run_in_executor`: its future reaches the loop's callbacks one turn later than this (the executor's
        future sets the loop's, whose callbacks run a turn after), and on a loop busy with hundreds of steps a
        turn is milliseconds, paid by every step waiting for the flush and by the next flush's start."""
        error: BaseException | None = None
        try:
            self._group.flush()
        except BaseException as e:  # a failed flush covers nobody: each of its steps fails (and is run again)
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown): nobody waits any more
            loop.call_soon_threadsafe(self._finished, covered, error)

    def _finished(self, covered: list[asyncio.Future[None]], error: BaseException | None) -> None:
        self._running = False
        for asked in covered:
            if asked.done():  # its step was cancelled meanwhile
                continue
            if error is None:
                asked.set_result(None)
            elif isinstance(error, Exception):
                asked.set_exception(error)
            else:  # SystemExit and the like, raised on the flusher's thread
                failed = RuntimeError(f"the flush failed: {error!r}")
                failed.__cause__ = error
                asked.set_exception(failed)
        if self._asking:
            self._start()

    def close(self) -> None:
        self._thread.shutdown(wait=False)
