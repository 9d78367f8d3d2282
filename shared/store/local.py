"""The job store's files on this machine's disk: atomic, create-only and appended writes, each durable
before the name that publishes it (flushes grouped by `flush.py`), and the job record's lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from shared.randomness import random_token
from shared.store.backend import Append
from shared.store.flush import GroupFlush

# a temporary file's name is made at once and created exclusively (tempfile.mkstemp's way, without its
# per-call set-up); names taken already are tried this often
_TEMP_NAMES = 100


class LocalBackend:
    """Files on this machine. With `fsync` (the default) a file's data reaches the disk before the name
    that publishes it, and the name before the call returns: what a step committed survives a power loss.
    Flushes are grouped (`flush.py`): concurrent steps share them."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        # paths are built as strings: a step builds a dozen, and pathlib's cost adds up
        self._root = str(root)
        self.fsync = fsync
        self.blocking = fsync  # a flush takes milliseconds: worth a thread while other steps go on
        self.blocking_reads = False
        self._flush = GroupFlush(root)
        self._late = threading.local()  # `names_flushed_late`: the folders whose names wait, per thread

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root  # "": the store's own folder, as pathlib says

    def describe(self, key: str) -> str:
        return self._path(key)

    def read(self, key: str) -> bytes | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        # plain reads of the size fstat gives, where open() adds a seek and a terminal check to each file
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)
            if len(data) == size:  # all of it as fstat saw it (one byte more was asked: growth would show)
                return data
            # a read may stop short (a file over 2 GiB, a network file system), and a log being appended
            # to may have grown since fstat: read on to its end
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    # --- durability -----------------------------------------------------------------------------------

    def _flush_files(self, fds: list[int]) -> None:
        """What was written to these open files is on the disk when this returns, and so is every name
        this thread left waiting (`names_flushed_late`)."""
        if not self.fsync:
            return
        if not self._flush.grouped:  # no syncfs to cover the waiting names: their folders are flushed first
            self._flush_waiting()
        self._flush.flush(fds)
        waiting: set[str] | None = getattr(self._late, "folders", None)
        if waiting:  # one syncfs of the whole file system covered them
            waiting.clear()

    @contextlib.contextmanager
    def names_flushed_late(self) -> Iterator[None]:
        """Within the block, this thread's names wait for the next flush of any file's data (one syncfs
        serves both) or the block's end. A name still reaches the disk before any later write's name: every
        create, replace or append flushes its data, and with it the waiting names, before it names a file."""
        if getattr(self._late, "folders", None) is not None:  # nested: the outer block flushes
            yield
            return
        self._late.folders = set()
        try:
            yield
        finally:
            waiting, self._late.folders = self._late.folders, None
            self._flush_names(waiting, now=True)

    def _flush_waiting(self) -> None:
        """The names this thread left waiting (`names_flushed_late`) are on the disk when this returns."""
        waiting: set[str] | None = getattr(self._late, "folders", None)
        if waiting:
            self._flush_names(waiting, now=True)
            waiting.clear()

    def _flush_names(self, folders: set[str], *, now: bool = False) -> None:
        """The names created or renamed in these folders are on the disk when this returns, or, in a
        `names_flushed_late` block (unless `now`), once the next flush or the block's end comes."""
        if not self.fsync or not folders:
            return
        waiting: set[str] | None = getattr(self._late, "folders", None)
        if waiting is not None and not now:
            waiting.update(folders)
            return
        if self._flush.grouped:
            self._flush.flush()
            return
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _parent(path: str, made: set[str]) -> None:
        """Make `path`'s folder if it is missing; note every folder whose entries changed."""
        missing = os.path.dirname(path)
        while not os.path.exists(missing) and missing != os.path.dirname(missing):
            missing = os.path.dirname(missing)
            made.add(missing)
        os.makedirs(os.path.dirname(path), exist_ok=True)

    # --- writing ---------------------------------------------------------------------------------------

    def _temp(self, path: str, data: bytes, made: set[str]) -> tuple[int, str]:
        """A temporary file beside `path` holding `data`, still open and not yet flushed."""
        folder, name = os.path.split(path)
        try:
            fd, tmp = _create_temp(folder, name)
        except FileNotFoundError:  # the folder is new: make it then (a mkdir on every write costs a syscall)
            self._parent(path, made)
            fd, tmp = _create_temp(folder, name)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp

    def _append_open(self, key: str, data: bytes, made: set[str]) -> int:
        """Append with one write() of an O_APPEND file (lines of concurrent writers never interleave);
        return the open file, noting its folder when this write made it."""
        path = self._path(key)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            self._parent(path, made)
            fd = os.open(path, flags, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                made.add(os.path.dirname(path))  # this write makes the file: its name must last too
            elif os.pread(fd, 1, size - 1) != b"\n":
                # a crash cut the last line short: start on a line of our own, or the reader would see
                # our first line glued to the torn one and drop both
                data = b"\n" + data
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _publish(self, fds: list[int], tmp: str, path: str, made: set[str], *, exclusive: bool) -> bool:
        """Flush the written files (and close them), then give the temporary file its name (only if the
        name is free when `exclusive`), then flush the name."""
        try:
            self._flush_files(fds)
        finally:
            for fd in fds:
                os.close(fd)
        renamed = False
        try:
            if exclusive:
                os.link(tmp, path)  # fails if the name exists: of two attempts, exactly one links
            else:
                os.replace(tmp, path)
                renamed = True  # the temporary name went with it: no unlink that can only fail
        except FileExistsError:
            return False
        finally:
            if not renamed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self._flush_names({os.path.dirname(path), *made})
        return True

    def write(self, key: str, data: bytes) -> None:
        path, made = self._path(key), set[str]()
        fd, tmp = self._temp(path, data, made)
        self._publish([fd], tmp, path, made, exclusive=False)

    def create(self, key: str, data: bytes) -> bool:
        path, made = self._path(key), set[str]()
        fd, tmp = self._temp(path, data, made)
        return self._publish([fd], tmp, path, made, exclusive=True)

    def append(self, key: str, data: bytes, order: int = 0) -> None:
        made = set[str]()
        fd = self._append_open(key, data, made)
        try:
            self._flush_files([fd])
        finally:
            os.close(fd)
        self._flush_names(made)

    def commit(self, appends: list[Append], key: str, data: bytes) -> bool:
        """The appends and the commit file written first and flushed together, then the file's name."""
        path, made = self._path(key), set[str]()
        fds: list[int] = []
        try:
            for append in appends:
                fds.append(self._append_open(append.key, append.data, made))
            fd, tmp = self._temp(path, data, made)
        except BaseException:
            for opened in fds:
                os.close(opened)
            raise
        return self._publish([*fds, fd], tmp, path, made, exclusive=True)

    def list(self, prefix: str) -> list[str]:
        try:
            return [e.name for e in os.scandir(self._path(prefix)) if not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete_tree(self, prefix: str) -> None:
        # a removal may reach the disk before names made earlier (another process's flush of the folder
        # makes it durable): the names this thread left waiting go first, or a power loss could keep the
        # removal (an unfinished marker) and lose what it follows (the final job record)
        self._flush_waiting()
        path = self._path(prefix)
        try:
            os.unlink(path)  # most often one marker file: one call, with no look at what it is first
        except FileNotFoundError:
            pass
        except (IsADirectoryError, PermissionError):  # a folder (macOS refuses with EPERM)
            if not os.path.isdir(path):
                raise
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold an exclusive lock named by `key` (a dot file beside it) across processes of this machine."""
        folder, name = os.path.split(self._path(key))
        lock = f"{folder}/.{name}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """Create `.{name}.{random}.tmp` in `folder`, private to this user as mkstemp makes it; return it open."""
    for _ in range(_TEMP_NAMES):
        tmp = f"{folder}/.{name}.{random_token(6)}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a full disk) without an error: go on until all is written, so
    that a short write raises instead of publishing a cut-off file."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"wrote nothing of {len(view)} bytes")
        view = view[written:]
