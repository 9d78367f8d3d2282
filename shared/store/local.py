"""The job store's files on this machine's disk: atomic, create-only and appended writes, each durable
before the name that publishes it (flushes grouped by `flush.py`), and the job record's lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared.store.backend import Append
from shared.store.flush import GroupFlush


class LocalBackend:
    """Files on this machine. With `fsync` (the default) a file's data reaches the disk before the name
    that publishes it, and the name before the call returns: what a step committed survives a power loss.
    Flushes are grouped (`flush.py`): concurrent steps share them."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.blocking = fsync  # a flush takes milliseconds: worth a thread while other steps go on
        self._flush = GroupFlush(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def describe(self, key: str) -> str:
        return str(self._path(key))

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # --- durability -----------------------------------------------------------------------------------

    def _flush_files(self, fds: list[int]) -> None:
        """What was written to these open files is on the disk when this returns."""
        if self.fsync:
            self._flush.flush(fds)

    def _flush_names(self, folders: set[Path]) -> None:
        """The names created or renamed in these folders are on the disk when this returns."""
        if not self.fsync or not folders:
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
    def _parent(path: Path, made: set[Path]) -> None:
        """Make `path`'s folder if it is missing; note every folder whose entries changed."""
        missing = path.parent
        while not missing.exists() and missing != missing.parent:
            made.add(missing.parent)
            missing = missing.parent
        path.parent.mkdir(parents=True, exist_ok=True)

    # --- writing ---------------------------------------------------------------------------------------

    def _temp(self, path: Path, data: bytes, made: set[Path]) -> tuple[int, str]:
        """A temporary file beside `path` holding `data`, still open and not yet flushed."""
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:  # the folder is new: make it then (a mkdir on every write costs a syscall)
            self._parent(path, made)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp

    def _append_open(self, key: str, data: bytes, made: set[Path]) -> int:
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
                made.add(path.parent)  # this write makes the file: its name must last too
            elif os.pread(fd, 1, size - 1) != b"\n":
                # a crash cut the last line short: start on a line of our own, or the reader would see
                # our first line glued to the torn one and drop both
                data = b"\n" + data
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _publish(self, fds: list[int], tmp: str, path: Path, made: set[Path], *, exclusive: bool) -> bool:
        """Flush the written files (and close them), then give the temporary file its name (only if the
        name is free when `exclusive`), then flush the name."""
        try:
            self._flush_files(fds)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            if exclusive:
                os.link(tmp, path)  # fails if the name exists: of two attempts, exactly one links
            else:
                os.replace(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._flush_names({path.parent, *made})
        return True

    def write(self, key: str, data: bytes) -> None:
        path, made = self._path(key), set[Path]()
        fd, tmp = self._temp(path, data, made)
        self._publish([fd], tmp, path, made, exclusive=False)

    def create(self, key: str, data: bytes) -> bool:
        path, made = self._path(key), set[Path]()
        fd, tmp = self._temp(path, data, made)
        return self._publish([fd], tmp, path, made, exclusive=True)

    def append(self, key: str, data: bytes, order: int = 0) -> None:
        made = set[Path]()
        fd = self._append_open(key, data, made)
        try:
            self._flush_files([fd])
        finally:
            os.close(fd)
        self._flush_names(made)

    def commit(self, appends: list[Append], key: str, data: bytes) -> bool:
        """The appends and the commit file written first and flushed together, then the file's name."""
        path, made = self._path(key), set[Path]()
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
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold an exclusive lock named by `key` (a dot file beside it) across processes of this machine."""
        path = self._path(key)
        lock = path.parent / f".{path.name}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a full disk) without an error: go on until all is written, so
    that a short write raises instead of publishing a cut-off file."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"wrote nothing of {len(view)} bytes")
        view = view[written:]
