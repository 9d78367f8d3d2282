"""The job store's files on this machine's disk: atomic, create-only and appended writes, each durable
before the name that publishes it (flushes grouped by `flush.py`), and the job record's lock."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar, cast

from shared.randomness import random_token
from shared.store.backend import LOCK_BUSY, Append, Flush, Offload, Steps
from shared.store.flush import GroupFlush, LoopFlush, libc_function

T = TypeVar("T")
# what a step on an event loop waits in while the store flushes (worker/gate.py: it lets another step go)
Aside = Callable[[], contextlib.AbstractAsyncContextManager[None]]
# how long a write waits before it tries a busy lock again (the job record's: held for one update)
_LOCK_RETRY_S = 0.002
# how long a reader waits for a writer's lock before it reads past it (see `read_shared`)
_SHARED_WAIT_S = 2.0
# how long a writer waits for the lock before it writes past it (see `lock_steps`): far longer than any
# update holds it, flush included, short enough that a job's steps go on while the holder is stopped
_WRITE_PAST_S = 5.0
# how long a writer waits for a lock it found stuck before (`lock_steps`): several updates' flushes
_STUCK_GRACE_S = 0.05
_STUCK_KEPT = 1024  # how many stuck locks a process remembers

log = logging.getLogger("perq.store")


_RENAMEAT2 = libc_function("renameat2")  # glibc 2.28 and later
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
# what flock on a folder fails with where the file system cannot lock folders
_NO_FOLDER_LOCKS = (errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP)

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
        self._lock_folders: bool | None = None  # None: not known yet (`_lockable`)
        self._exchanges = _RENAMEAT2 is not None  # until a swap fails as unsupported here (`_rename`)
        # the folders whose lock was written past, until this process takes it again (`lock_steps`)
        self._stuck: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root  # "": the store's own folder, as pathlib says

    def describe(self, key: str) -> str:
        return self._path(key)

    def read(self, key: str) -> bytes | None:
        return _read_file(self._path(key))

    # --- running steps ----------------------------------------------------------------------------------

    def run(self, steps: Steps[T]) -> T:
        """Run a write's steps on this thread, each wait done in place."""
        plan = self._plan(steps)
        reply: Any = None
        try:
            while True:
                wait = plan.send(reply)
                reply = None
                if isinstance(wait, Flush):
                    self._flush_now(wait.fds, wait.folders)
                elif isinstance(wait, Offload):
                    reply = wait.work()
                else:
                    time.sleep(_LOCK_RETRY_S)
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            plan.close()

    async def run_async(
        self, steps: Steps[T], flusher: LoopFlush, offload: Executor | None, aside: Aside | None = None
    ) -> T:
        """Run a write's steps on an event loop: the writes inline, each wait awaited (inside `aside`, when
        given): a flush shared with every step that asked meanwhile (one syncfs on `flusher`'s thread),
        blocking work on `offload`, a busy lock (whose holder may be aside, flushing). Only where one syncfs
        flushes everything (`flushes_shared`): a flush there needs no list of what to flush."""
        assert self.flushes_shared
        plan = self._plan(steps)
        reply: Any = None
        try:
            while True:
                wait = plan.send(reply)
                async with (aside or contextlib.nullcontext)():
                    reply = None
                    if isinstance(wait, Flush):
                        await flusher.flush()
                    elif isinstance(wait, Offload):
                        reply = await asyncio.get_running_loop().run_in_executor(offload, wait.work)
                    else:
                        await asyncio.sleep(_LOCK_RETRY_S)
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            plan.close()

    @staticmethod
    def _plan(steps: Steps[T]) -> Steps[T]:
        """A write's steps as the waits a driver must make: names asked `late` wait for the next flush of
        data, for blocking work (which may name files of its own) or for the end; a flush that would cover
        nothing is left out. What comes out is only ever a flush now, blocking work, or a busy lock."""
        waiting: set[str] = set()
        reply: Any = None
        try:
            while True:
                request = steps.send(reply)
                reply = None
                if isinstance(request, Flush) and request.late:
                    waiting |= request.folders
                elif isinstance(request, Flush):
                    if waiting or request.fds or request.folders:
                        yield Flush(request.fds, frozenset(waiting | request.folders))
                        waiting.clear()
                elif isinstance(request, Offload):
                    if waiting:
                        yield Flush(folders=frozenset(waiting))
                        waiting.clear()
                    reply = yield request
                else:
                    yield request
        except StopIteration as done:
            if waiting:
                yield Flush(folders=frozenset(waiting))
            return cast(T, done.value)
        finally:
            steps.close()  # stopped at a wait (a failed flush, a cancelled step): files and lock let go

    @property
    def flushes_shared(self) -> bool:
        """Whether one flush of the file system covers every write (syncfs): steps can share flushes."""
        return self.fsync and self._flush.grouped

    @property
    def flush_group(self) -> GroupFlush:
        return self._flush

    def _flush_now(self, fds: Sequence[int], folders: set[str] | frozenset[str]) -> None:
        """What was written to `fds` and the names made in `folders` are on the disk when this returns."""
        if not self.fsync or not (fds or folders):
            return
        if self._flush.grouped:  # one syncfs covers all of it
            self._flush.flush()
            return
        for folder in folders:  # names that waited first: they were made before this data was written
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._flush.flush(fds)

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

    def _publish(
        self, fds: list[int], tmp: str, path: str, made: set[str], *, exclusive: bool
    ) -> Steps[bool]:
        """Flush the written files (and close them), then give the temporary file its name (only if the
        name is free when `exclusive`); the name is flushed late."""
        try:
            yield Flush(fds=tuple(fds))
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
        yield Flush(folders=frozenset((os.path.dirname(path), *made)), late=True)
        return True

    def write(self, key: str, data: bytes) -> None:
        path, made = self._path(key), set[str]()
        fd, tmp = self._temp(path, data, made)
        self.run(self._publish([fd], tmp, path, made, exclusive=False))

    def create(self, key: str, data: bytes) -> bool:
        path, made = self._path(key), set[str]()
        fd, tmp = self._temp(path, data, made)
        return self.run(self._publish([fd], tmp, path, made, exclusive=True))

    def mark(self, key: str) -> None:
        """An empty file whose name alone says something (the store's indexes): a hard link to one empty file
        of its folder (`.mark`). Why: marking and unmarking then neither allocate nor free an inode, and on
        ext4 without a journal every file created scans past the inodes freed in the last minutes (see
        `rewrite_steps`): a job's unfinished marker, dropped as it ends, made each following job's files
        cost more (bench: throughput). Where no link can be made (a file system without hard links), an
        empty file of its own; at the link limit the folder's `.mark` starts on a new file."""
        path = self._path(key)
        shared_key = f"{os.path.dirname(key)}/.mark"
        shared = self._path(shared_key)
        for _ in range(3):
            try:
                os.link(shared, path)
                break
            except FileExistsError:  # marked already
                break
            except FileNotFoundError:  # no `.mark` (or no folder) yet: made as any file is, durable
                self.write(shared_key, b"")
            except OSError as e:
                if e.errno != errno.EMLINK:
                    self.write(key, b"")  # no hard links here
                    return
                # a new `.mark` takes the old one's name; the old file stays, linked by its marks
                self.write(shared_key, b"")
        else:
            self.write(key, b"")
            return
        self._flush_now((), {os.path.dirname(path)})  # the name is on the disk

    def lay_out(
        self, *, folders: Sequence[str] = (), logs: Sequence[str] = (), rewritten: Sequence[str] = ()
    ) -> None:
        """Make now, where a job or a run begins, what its steps' writes would otherwise create: folders, the
        empty logs steps append to, the spares of files rewritten often. Why: a step's commit then creates
        one file (its checkpoint), and on ext4 without a journal a file created scans past every inode freed
        in the last minutes (after a test run or any large removal, a step's five creations cost a worker a
        third of its throughput: bench). With a flush of the whole file system (syncfs), what is made here is
        on the disk before anything that relies on it (the caller's own writes, a step's commit) is, each of
        them flushed by a later syncfs; elsewhere the folders whose entries it changed are flushed now. A
        write that finds something missing makes it again, as it always did."""
        made = set[str]()
        for folder in folders:
            path = self._path(folder)
            if not os.path.isdir(path):
                self._parent(f"{path}/.", made)
        # modes as the writes would make them: logs as appends do, spares as temporary files (private)
        files = [(self._path(key), 0o644) for key in logs]
        if self._swaps:
            files += [(_spare(self._path(key)), 0o600) for key in rewritten]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for path, mode in files:
            try:
                os.close(os.open(path, flags, mode))
            except FileExistsError:
                continue
            except FileNotFoundError:
                self._parent(path, made)
                try:
                    os.close(os.open(path, flags, mode))
                except FileExistsError:  # made meanwhile by another writer
                    continue
            made.add(os.path.dirname(path))
        if self.fsync and not self._flush.grouped:
            self._flush_now((), made)

    @property
    def _swaps(self) -> bool:
        """Whether a rewrite swaps the file with its spare (`rewrite_steps`): where renameat2 is, and a flush
        of the whole file system tells when a swap is on the disk (or nothing is flushed)."""
        return self._exchanges and not (self.fsync and not self._flush.grouped)

    def append(self, key: str, data: bytes, order: int = 0) -> None:
        made = set[str]()
        fd = self._append_open(key, data, made)
        try:
            self._flush_now((fd,), made)
        finally:
            os.close(fd)

    def commit(self, appends: list[Append], key: str, data: bytes) -> bool:
        return self.run(self.commit_steps(appends, key, data))

    def commit_steps(self, appends: list[Append], key: str, data: bytes) -> Steps[bool]:
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
        return (yield from self._publish([*fds, fd], tmp, path, made, exclusive=True))

    def rewrite_steps(
        self, key: str, data: bytes, *, replacing: bytes | None = None, past_lock: bool = False
    ) -> Steps[bool]:
        """`write`, for a file rewritten often under its lock (`lock_steps`): the new content goes into a
        spare file beside it, which then swaps names with it; the old file is the next rewrite's spare.

        Why: a replace frees the old file's inode, and ext4 without a journal skips every inode freed in
        the last minutes, one by one, at each file it creates: a job record rewritten every second per job
        made file creation a worker's largest kernel cost (bench: concurrency). The spare is never freed.
        Durability is `write`'s: the spare's data is flushed before the swap, the swap before the steps
        end, and a spare is overwritten only once the swap that made it the spare is on the disk (else a
        power loss could bring its name back on a torn file). Readers read under the lock (`read_shared`),
        so none reads a spare while it changes.

        `replacing`: the content the writer read and changed. The file is then swapped only if it still
        holds that content, checked and swapped under a lock of the file itself (`_replace_if`); False
        when it did not (another writer wrote past the lock meanwhile, `lock_steps`): nothing was written,
        and the caller reads the file again. `past_lock`: the lock was written past (None from
        `lock_steps`): the content goes into a file of its own, as the spare is the lock holder's."""
        path, made = self._path(key), set[str]()
        swap = self._swaps and not past_lock
        if swap:
            new = _spare(path)
            fd = yield from self._filled_spare(path, new, data, made)
        else:
            # no swap here, or no flush of the whole file system to tell a swap durable, or the spare is
            # the lock holder's: as `write`
            fd, new = self._temp(path, data, made)
        written = False
        try:
            yield Flush(fds=(fd,), folders=frozenset(made))
            closing, fd = fd, -1
            os.close(closing)
            written = yield from self._replace_if(new, path, replacing, swap=swap)
            if written:
                yield Flush(folders=frozenset((os.path.dirname(path),)))
        finally:
            if fd >= 0:
                os.close(fd)
            if not swap and not written:  # a file of its own, never given the name
                with contextlib.suppress(OSError):
                    os.unlink(new)
        return written

    def _filled_spare(self, path: str, spare: str, data: bytes, made: set[str]) -> Steps[int]:
        """The spare of the file at `path`, holding `data` (not yet flushed), open."""
        try:
            fd = os.open(spare, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = self._new_spare(path, spare, made)  # a new file: no name ever reached it
        try:
            # the spare's ctime is the swap that made it the spare (an interrupted writer, in any process,
            # may not have flushed it): a flush begun after it covers it, else one is made first. An empty
            # spare was never the record (one laid out, `lay_out`): no name can come back onto it
            spare_stat = os.fstat(fd)
            if spare_stat.st_size and self.fsync and not self._flush.covers(spare_stat.st_ctime_ns):
                yield Flush(folders=frozenset((os.path.dirname(path),)))
            _write_all(fd, data)
            os.ftruncate(fd, len(data))  # after the write: the old content is never cut to nothing first
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _replace_if(self, new: str, path: str, replacing: bytes | None, *, swap: bool) -> Steps[bool]:
        """Give `new` the name `path` (a swap, or a replace), if `path` still holds `replacing` (None: in any
        case). The check and the swap hold an exclusive lock of the file at `path` itself: a writer past the
        folder's lock and the folder lock's holder never both swap on what they read. That lock is held for
        microseconds, never across a flush, and is never written past (`lock_steps`)."""
        if replacing is None or not self._lock_folders:  # no check, or none needed: never written past
            self._rename(new, path, swap=swap)
            return True
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # removed (the job deleted): nothing to change
                return False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield LOCK_BUSY  # another writer checks and swaps: microseconds
                    continue
                locked = os.fstat(fd)
                try:
                    named = os.stat(path).st_ino
                except FileNotFoundError:
                    return False
                if locked.st_ino != named:
                    # swapped meanwhile: the file locked is the spare now, perhaps still holding what was read
                    continue
                if locked.st_size != len(replacing) or _read_fd(fd, locked.st_size) != replacing:
                    return False
                self._rename(new, path, swap=swap)
                return True
            finally:
                os.close(fd)

    def _rename(self, new: str, path: str, *, swap: bool) -> None:
        """Give `new` the name `path`: by a swap where names swap (`new` then holds what `path` held)."""
        if not swap:
            os.replace(new, path)
            return
        try:
            _exchange(new, path)
        except FileNotFoundError:  # the first write of the file: the new one takes its name
            os.rename(new, path)
        except OSError as e:
            if e.errno not in _NO_EXCHANGE:
                raise
            self._exchanges = False  # later rewrites write a file of their own (`_swaps`)
            os.replace(new, path)  # a file system without the swap (some network ones): as `write`

    def _new_spare(self, path: str, spare: str, made: set[str]) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(spare, flags, 0o600)
        except FileNotFoundError:  # a new folder
            self._parent(path, made)
            return os.open(spare, flags, 0o600)

    def removal_steps(self, key: str) -> Steps[None]:
        # a removal may reach the disk before names made earlier (another process's flush of the folder
        # makes it durable): the names waiting go first, or a power loss could keep the removal (an
        # unfinished marker) and lose what it follows (the final job record)
        yield Flush()
        self.delete_tree(key)

    def list(self, prefix: str) -> list[str]:
        try:
            return [e.name for e in os.scandir(self._path(prefix)) if not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete_tree(self, prefix: str) -> None:
        path = self._path(prefix)
        try:
            os.unlink(path)  # most often one marker file: one call, with no look at what it is first
        except FileNotFoundError:
            pass
        except (IsADirectoryError, PermissionError):  # a folder (macOS refuses with EPERM)
            if not os.path.isdir(path):
                raise
            shutil.rmtree(path, ignore_errors=True)

    def lock_steps(self, key: str) -> Steps[int | None]:
        """An exclusive lock named by `key` across threads, steps and processes of this machine: a lock on
        the folder that holds it (a lock file beside it would be one more file to create per job record).
        Waited for by trying again (`LOCK_BUSY`), so a step on an event loop never blocks on it. Returns the
        lock to give to `unlock`.

        A process stopped while it holds the lock (SIGSTOP, a frozen container, a debugger) lets go of
        nothing, and a lease is not a lock: another worker takes its job's steps over and must not wait on
        it. So a lock held `_WRITE_PAST_S` is written past (None is returned; this process's later writers
        of the key wait only `_STUCK_GRACE_S`, until it takes the lock again). A rewrite then swaps the file
        only if it still holds what the writer read (`rewrite_steps`), so neither the writer past the lock
        nor its holder, woken, can write over what the other wrote. Where folders cannot be locked (NFS),
        the lock is waited for as long as it takes."""
        folder = os.path.dirname(self._path(key))
        try:
            fd = self._lockable(folder)
        except FileNotFoundError:  # a new folder (a mkdir on every lock would cost a syscall)
            os.makedirs(folder, exist_ok=True)
            fd = self._lockable(folder)
        # a lock found stuck before is gone past sooner, though not at once: its holder may have let it go
        # and another taken it for the milliseconds of an update
        patience = _WRITE_PAST_S if folder not in self._stuck else _STUCK_GRACE_S
        since: float | None = None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._stuck.discard(folder)
                    return fd
                except BlockingIOError:
                    now = time.monotonic()
                    if since is None:
                        since = now
                    elif now - since >= patience and self._lock_folders:
                        break
                    yield LOCK_BUSY
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if folder not in self._stuck:
            log.warning(
                "the lock of %s was held %.1f s (its holder stopped? writers queued?): writing past it",
                self._path(key),
                now - since,
            )
            if len(self._stuck) >= _STUCK_KEPT:
                self._stuck.clear()
        self._stuck.add(folder)
        return None

    def _lockable(self, folder: str, *, reading: bool = False) -> int:
        """What locks a folder's file, open: the folder itself; where the file system cannot lock a folder
        (NFS emulates flock with locks that need a file open for writing), a `.lock` file in it (which a
        reader only opens: FileNotFoundError when no writer made it)."""
        if self._lock_folders is False:
            if reading:
                return os.open(f"{folder}/.lock", os.O_RDONLY | os.O_CLOEXEC)
            return os.open(f"{folder}/.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self._lock_folders is None:  # the first lock tells whether folders lock here, as writers lock
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                pass  # held by another: folders lock
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_FOLDER_LOCKS:
                    raise
                self._lock_folders = False
                return self._lockable(folder, reading=reading)
            self._lock_folders = True
        return fd

    def unlock(self, lock: int | None) -> None:
        if lock is not None:  # None: written past (`lock_steps`)
            os.close(lock)  # closing the folder lets its lock go

    def read_shared(self, key: str) -> bytes | None:
        """`read` under `key`'s lock, shared with other readers: no rewrite changes the file meanwhile. A
        lock held past `_SHARED_WAIT_S` (a writer stopped mid-update, by SIGSTOP or a debugger) is read past:
        a stopped writer changes nothing, and a reader must not hang on it."""
        try:
            fd = self._lockable(os.path.dirname(self._path(key)), reading=True)
        except (FileNotFoundError, NotADirectoryError):  # no folder (no record), or no writer's lock file
            return self.read(key)
        try:
            deadline = time.monotonic() + _SHARED_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(_LOCK_RETRY_S)
            return self.read(key)
        finally:
            os.close(fd)


def _read_file(path: str) -> bytes | None:
    """A whole file, or None where there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int, size: int | None = None) -> bytes:
    """The whole of an open file, read from where its offset is (a file just opened: its start); `size`:
    its size, when the caller has just asked fstat."""
    # plain reads of the size fstat gives, where open() adds a seek and a terminal check to each file
    if size is None:
        size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)
    if len(data) == size:  # all of it as fstat saw it (one byte more was asked: growth would show)
        return data
    # a read may stop short (a file over 2 GiB, a network file system), and a log being appended to may
    # have grown since fstat: read on to its end
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """Create `.{name}.{random}.tmp` in `folder`, private to this user as mkstemp makes it; return it open."""
    for _ in range(_TEMP_NAMES):
        tmp = f"{folder}/.{name}.{random_token(6)}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


def _spare(path: str) -> str:
    """The spare beside a file rewritten by swaps (`rewrite_steps`): hidden from listings."""
    folder, name = os.path.split(path)
    return f"{folder}/.{name}.spare"


def _exchange(a: str, b: str) -> None:
    """Swap the files named `a` and `b` in one step (renameat2's RENAME_EXCHANGE): each name names one
    whole file throughout. FileNotFoundError when either is missing."""
    assert _RENAMEAT2 is not None
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a, None, b)  # ENOENT comes out as FileNotFoundError


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a full disk) without an error: go on until all is written, so
    that a short write raises instead of publishing a cut-off file."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"wrote nothing of {len(view)} bytes")
        view = view[written:]
