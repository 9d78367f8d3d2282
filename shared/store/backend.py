"""What a job store keeps its files in: the `Backend` protocol every place of storage implements (this
machine's disk in `local.py`, S3 in `s3.py`), and the errors they raise.

Kept apart from the store's logic (`jobs.py`) so that a backend depends on this contract alone, not on the
store that uses it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol


class StoreError(Exception):
    """A file of the store that is missing or damaged; the message names it."""


class Backend(Protocol):
    """Where the store's files live: keys are '/'-separated relative paths."""

    blocking: bool  # calls wait on a network or a disk flush: a worker runs them off its event loop
    # reads wait on a network: a worker runs them off its event loop too (a local read, served from the page
    # cache, costs less than the thread hop)
    blocking_reads: bool

    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...  # atomic and durable: old or new, never torn
    def create(self, key: str, data: bytes) -> bool: ...  # like write, only if absent; False if it exists
    # durable; `order` sorts the pieces of a log on stores that cannot append (the step number)
    def append(self, key: str, data: bytes, order: int = 0) -> None: ...
    # the appends, all durable, then `create` of the commit file: one flush for all of them where it can
    def commit(self, appends: list[Append], key: str, data: bytes) -> bool: ...
    # within the block, this thread's writes may leave their names' flush to the next flush of any file's
    # data or to the block's end, whichever comes first: every name is durable when the block ends
    def names_flushed_late(self) -> AbstractContextManager[None]: ...
    def list(self, prefix: str) -> list[str]: ...  # names directly under prefix
    def delete_tree(self, prefix: str) -> None: ...
    def describe(self, key: str) -> str: ...  # how to name the file to a person


@dataclass
class Append:
    key: str
    data: bytes
    order: int = 0
