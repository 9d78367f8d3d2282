"""The job store on S3-compatible object storage (`PERQ_STORAGE=s3://bucket/prefix`), through s3fs.

Same keys as the local store under an optional prefix, so workers on many machines share one store without
a shared disk. Every file is one object written with a single PUT, which S3 makes visible whole or not at
all: the store's atomic-write rule holds without temporary names.

Logs (keys ending in `.jsonl`, i.e. a run's events.jsonl) cannot be appended to on S3. Rewriting the whole
object on each step would cost O(size of the log) per step, and a run's events grow with its history. So a
log is a folder of segments, `{key}.parts/{seq}-{a|w}-{token}.jsonl`, read back in order:

- `append` PUTs one new segment (`a`) named by the step it belongs to, then the time and a random token:
  segments sort in step order, and two attempts of one step never overwrite each other's (readers keep the
  one that committed the step).
- Logs are never rewritten. A `w` segment, which earlier versions wrote when they rewrote a log, replaces
  everything before it; readers still start from the last one.
- A plain object at the log's own key (a local store copied to S3 as is) is read as the log's start when
  no `w` segment supersedes it.

The endpoint comes from `PERQ_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS;
credentials and region come from the standard AWS variables and files.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from tenacity import retry, retry_if_exception_type, stop_after_attempt

from shared.store.backend import Offload, Steps, no_steps

if TYPE_CHECKING:
    from shared.store.backend import Append

T = TypeVar("T")

LOG_SUFFIX = ".jsonl"
PARTS_SUFFIX = ".parts"
# reads of a log that keeps changing, before the reader gives up with LogChanged
_READ_TRIES = 5
GLOB_CHARS = ("*", "?", "[", "]")


class LogChanged(OSError):
    """A segment of a log vanished between its listing and its read (the log is read again)."""


class S3Backend:
    """A `Backend` on an S3 bucket: keys are object names under `prefix`."""

    blocking = True
    blocking_reads = True

    def __init__(self, bucket: str, prefix: str = "", fs: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.fs = fs if fs is not None else _filesystem()

    @classmethod
    def from_url(cls, url: str) -> S3Backend:
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"invalid store location {url!r}: use s3://bucket/prefix")
        if any(c in rest for c in GLOB_CHARS):
            # s3fs reads these as patterns in rm/cat; the store's own ids never hold them
            raise ValueError(f"invalid store location {url!r}: no {' '.join(GLOB_CHARS)} in bucket or prefix")
        return cls(bucket, prefix)

    # --- names --------------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        key = key.strip("/")
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return f"{base}/{key}" if key else base

    def describe(self, key: str) -> str:
        return f"s3://{self._path(key)}"

    @staticmethod
    def _is_log(key: str) -> bool:
        return key.endswith(LOG_SUFFIX)

    def _parts(self, key: str) -> list[str]:
        """The log's segment names, in order."""
        return sorted(self._names(self._path(key + PARTS_SUFFIX)))

    def _names(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            entry = entry.rstrip("/")
            if entry != path:  # ls of an object's own name lists the object itself
                names.append(entry.rsplit("/", 1)[-1])
        return names

    # --- Backend ------------------------------------------------------------------------------------

    def read(self, key: str) -> bytes | None:
        if self._is_log(key):
            return self._read_log(key)
        try:
            data: bytes = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        return data

    def write(self, key: str, data: bytes) -> None:
        if not self._is_log(key):
            self.fs.pipe_file(self._path(key), data)
            return
        raise ValueError(f"cannot rewrite {self.describe(key)}: the store's logs are append-only")

    def mark(self, key: str) -> None:
        self.write(key, b"")

    def lay_out(
        self, *, folders: Sequence[str] = (), logs: Sequence[str] = (), rewritten: Sequence[str] = ()
    ) -> None:
        return None  # no folders, and an object is made by its first PUT whoever makes it

    # --- as steps: a PUT is durable when it returns, so nothing waits (no flush, no lock) ----------------

    def commit_steps(self, appends: list[Append], key: str, data: bytes) -> Steps[bool]:
        return no_steps(self.commit(appends, key, data))

    def read_shared(self, key: str) -> bytes | None:
        return self.read(key)  # an object is replaced whole: a read sees one version

    def rewrite_steps(
        self, key: str, data: bytes, *, replacing: bytes | None = None, past_lock: bool = False
    ) -> Steps[bool]:
        self.write(key, data)  # no lock, so none written past (`lock_steps`): nothing to check
        return no_steps(True)

    def removal_steps(self, key: str) -> Steps[None]:
        self.delete_tree(key)
        return no_steps(None)

    def lock_steps(self, key: str) -> Steps[None]:
        # no lock across machines: the rules of shared/job_record.py keep a late writer from moving a job back
        return no_steps(None)

    def unlock(self, lock: None) -> None:
        pass

    def run(self, steps: Steps[T]) -> T:
        reply: Any = None
        try:
            while True:
                request = steps.send(reply)
                reply = request.work() if isinstance(request, Offload) else None
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            steps.close()

    def create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (`If-None-Match: *`): S3 lets exactly one of two writers of a new name win."""
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:  # s3fs names the refusal FileExistsError only when S3 says which condition
            if "precondition" in str(e).lower():
                return False
            raise
        return True

    def commit(self, appends: list[Append], key: str, data: bytes) -> bool:
        for append in appends:
            self.append(append.key, append.data, append.order)
        return self.create(key, data)

    def append(self, key: str, data: bytes, order: int = 0) -> None:
        """One new segment, named by `order` then the time: no listing, so an append costs one PUT however
        long the log is (the store's logs are appended to in step order, one step at a time)."""
        if not self._is_log(key):
            raise ValueError(f"cannot append to {self.describe(key)}: only {LOG_SUFFIX} logs take appends")
        name = f"{order:012d}-a-{time.time_ns():020d}{secrets.token_hex(4)}{LOG_SUFFIX}"
        self.fs.pipe_file(f"{self._path(key + PARTS_SUFFIX)}/{name}", data)

    def list(self, prefix: str) -> list[str]:
        names: list[str] = []
        for name in self._names(self._path(prefix)):
            if name.startswith("."):
                continue
            if name.endswith(LOG_SUFFIX + PARTS_SUFFIX):
                name = name.removesuffix(PARTS_SUFFIX)  # a log's segments are one file to the store
            if name not in names:
                names.append(name)
        return names

    def delete_tree(self, prefix: str) -> None:
        paths = [self._path(prefix)]
        if self._is_log(prefix):
            paths.append(self._path(prefix + PARTS_SUFFIX))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)

    # --- logs ---------------------------------------------------------------------------------------

    # A rewrite that deletes a segment between our listing and our read shows as a missing segment: the log
    # is listed and read again at once (the rewrite's own `w` segment is then in the listing).
    @retry(retry=retry_if_exception_type(LogChanged), stop=stop_after_attempt(_READ_TRIES), reraise=True)
    def _read_log(self, key: str) -> bytes | None:
        folder = self._path(key + PARTS_SUFFIX)
        parts = self._parts(key)
        start = max((i for i, p in enumerate(parts) if _kind(p) == "w"), default=None)
        chunks: list[bytes] = []
        if start is None:
            try:
                chunks.append(self.fs.cat_file(self._path(key)))
            except FileNotFoundError:
                if not parts:
                    return None
            start = 0
        paths = [f"{folder}/{p}" for p in parts[start:]]
        found: dict[str, Any] = self.fs.cat(paths, on_error="return") if paths else {}
        if any(not isinstance(found.get(p), bytes) for p in paths):
            raise LogChanged(f"{self.describe(key)} kept changing while it was read")
        chunks.extend(found[p] for p in paths)
        # each segment is whole lines; one without its last newline must not run into the next
        return b"".join(c if c.endswith(b"\n") else c + b"\n" for c in chunks if c)


def _kind(name: str) -> str:
    bits = name.split("-", 2)
    return bits[1] if len(bits) == 3 else ""


def _filesystem() -> Any:
    try:
        import s3fs
    except ImportError as e:  # the s3 extra is optional: say how to get it
        raise ValueError("PERQ_STORAGE is an s3:// URL but s3fs is missing: pip install 'perq[s3]'") from e
    from shared.config import StoreSection

    endpoint = StoreSection().s3_endpoint_url
    # listings must never come from a cache: other machines write the same store
    return s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)
