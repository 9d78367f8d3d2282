"""What a job store keeps its files in: the `Backend` protocol every place of storage implements (this
machine's disk in `local.py`, S3 in `s3.py`), and the errors they raise.

Kept apart from the store's logic (`jobs.py`) so that a backend depends on this contract alone, not on the
store that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """A file of the store that is missing or damaged; the message names it."""


@dataclass(frozen=True)
class Flush:
    """A point in a write's steps where what it wrote must be on the disk before it goes on: the data
    written to `fds`, and the names made in `folders`. `late`: the names may wait for the next flush of any
    data, or the steps' end, whichever comes first (one flush serves both)."""

    fds: tuple[int, ...] = ()
    folders: frozenset[str] = field(default_factory=frozenset)
    late: bool = False


@dataclass(frozen=True)
class Offload(Generic[T]):
    """Work inside a write's steps that blocks (it writes and flushes on its own): run elsewhere than an
    event loop, after the names waiting so far are on the disk; the steps get its result back."""

    work: Callable[[], T]


class LockBusy:
    """The lock a write's steps wait for is held: try again shortly."""


LOCK_BUSY = LockBusy()

# A write as a generator of the points where it waits (flushes, a busy lock, blocking work), returning its
# result: the same steps run on a thread (`Backend.run`, which waits in place) or on an event loop (the
# local store's `run_async`, where the waits are awaited and a flush is shared by every step that asked).
Steps = Generator[Flush | Offload[Any] | LockBusy, Any, T]


def no_steps(value: T) -> Steps[T]:
    """Steps that wait on nothing: a write that was done (durably) before it returns `value`."""
    return value
    yield  # a generator all the same


class Backend(Protocol):
    """Where the store's files live: keys are '/'-separated relative paths."""

    blocking: bool  # calls wait on a network or a disk flush: a worker runs them off its event loop
    # reads wait on a network: a worker runs them off its event loop too (a local read, served from the page
    # cache, costs less than the thread hop)
    blocking_reads: bool

    def read(self, key: str) -> bytes | None: ...
    # read, of a file rewritten under its lock (`rewrite_steps`): never while a rewrite changes it
    def read_shared(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...  # atomic and durable: old or new, never torn
    def create(self, key: str, data: bytes) -> bool: ...  # like write, only if absent; False if it exists
    # an empty file whose name alone says something (an index's entry), durable like `write`'s
    def mark(self, key: str) -> None: ...
    # make ahead what later writes would create (folders, empty logs, a rewritten file's spare): see local.py
    def lay_out(
        self, *, folders: Sequence[str] = (), logs: Sequence[str] = (), rewritten: Sequence[str] = ()
    ) -> None: ...
    # durable; `order` sorts the pieces of a log on stores that cannot append (the step number)
    def append(self, key: str, data: bytes, order: int = 0) -> None: ...
    # the appends, all durable, then `create` of the commit file: one flush for all of them where it can
    def commit(self, appends: list[Append], key: str, data: bytes) -> bool: ...
    # as steps (`Steps`), where a composed write lets one flush serve two writes: `commit`; `write` of a
    # file rewritten often while its lock is held (the job record); the lock itself (None where the
    # store has none) and its release
    def commit_steps(self, appends: list[Append], key: str, data: bytes) -> Steps[bool]: ...
    # `rewrite_steps` returns False when the file no longer held `replacing`: nothing written (see local.py)
    def rewrite_steps(
        self, key: str, data: bytes, *, replacing: bytes | None = None, past_lock: bool = False
    ) -> Steps[bool]: ...
    def removal_steps(self, key: str) -> Steps[None]: ...  # delete_tree, after every name made before it
    def lock_steps(self, key: str) -> Steps[Any]: ...  # None: no lock held (written past, or none here)
    def unlock(self, lock: Any) -> None: ...
    def run(self, steps: Steps[T]) -> T: ...  # run steps on this thread, waiting where they wait
    def list(self, prefix: str) -> list[str]: ...  # names directly under prefix
    def delete_tree(self, prefix: str) -> None: ...
    def describe(self, key: str) -> str: ...  # how to name the file to a person


@dataclass
class Append:
    key: str
    data: bytes
    order: int = 0
