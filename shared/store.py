"""The job store: Perstack's on-disk layout (spec §5.1, after PR #83), written atomically.

    jobs/{jobId}/job.json
    jobs/{jobId}/checkpoints/{checkpointId}.json
    jobs/{jobId}/runs/{runId}/run-setting.json
    jobs/{jobId}/runs/{runId}/initial-checkpoint.json   perq: where a run segment starts (startRun's)
    jobs/{jobId}/runs/{runId}/events.jsonl              perq: one line per event (spec §9 #24)
    index/{inverted startedAt}-{jobId}                  perq: empty markers, newest job first by name
    unfinished/{jobId}                                  perq: empty markers of jobs queued, running, or
                                                        cancelled with a step perhaps still running

The store is the truth about jobs; Redis only carries the work. Paths are built only from ids checked by
`check_id`, so no id from a payload or the command line can leave the store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import ValidationError

from shared.models import FINAL_JOB_STATUSES, Checkpoint, Event, Job, RunSetting, check_id, derived_id

T = TypeVar("T", Job, Checkpoint, RunSetting)
_INDEX_BASE = 10**13  # startedAt in ms stays below this until the year 2286


class StoreError(Exception):
    """A file of the store that is missing or damaged; the message names it."""


class Backend(Protocol):
    """Where the store's files live: keys are '/'-separated relative paths."""

    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...  # atomic: readers see old or new, never torn
    def append(self, key: str, data: bytes) -> None: ...
    def list(self, prefix: str) -> list[str]: ...  # names directly under prefix
    def delete_tree(self, prefix: str) -> None: ...
    def describe(self, key: str) -> str: ...  # how to name the file to a person


class LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def describe(self, key: str) -> str:
        return str(self._path(key))

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:  # the folder is new: make it then (a mkdir on every write costs a syscall)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def append(self, key: str, data: bytes) -> None:
        path = self._path(key)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        # one write() of an O_APPEND file: lines of concurrent writers never interleave
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

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


def open_backend(location: str) -> Backend:
    """A store location: a local path (default ./perstack), or s3://bucket/prefix (shared/s3store.py)."""
    if location.startswith("s3://"):
        from shared.s3store import S3Backend  # s3fs is an optional extra, imported only when used

        return S3Backend.from_url(location)
    return LocalBackend(Path(location).expanduser().resolve())


@dataclass
class Listing:
    jobs: list[Job]
    problems: list[str]  # damaged records, by name, that the listing skipped
    total: int


class JobStore:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    def open(cls, location: str) -> JobStore:
        return cls(open_backend(location))

    @property
    def local_root(self) -> Path | None:
        """The store's directory when it is on this machine (file tools must refuse it)."""
        return self.backend.root if isinstance(self.backend, LocalBackend) else None

    # --- keys ---------------------------------------------------------------------------------------

    @staticmethod
    def _job(job_id: str) -> str:
        return f"jobs/{check_id(job_id, 'job id')}"

    def _checkpoint(self, job_id: str, checkpoint_id: str) -> str:
        return f"{self._job(job_id)}/checkpoints/{check_id(checkpoint_id, 'checkpoint id')}.json"

    def _run(self, job_id: str, run_id: str) -> str:
        return f"{self._job(job_id)}/runs/{check_id(run_id, 'run id')}"

    # --- generic json -------------------------------------------------------------------------------

    def _load(self, key: str, model: type[T]) -> T | None:
        data = self.backend.read(key)
        if data is None:
            return None
        try:
            return model.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(f"damaged file {self.backend.describe(key)}: {e.errors()[0]['msg']}") from e

    # --- jobs ---------------------------------------------------------------------------------------

    def save_job(self, job: Job, *, new: bool = False) -> None:
        data = job.model_dump_json(by_alias=True, indent=2, exclude_none=True).encode()
        self.backend.write(f"{self._job(job.id)}/job.json", data)
        if new:
            self.backend.write(f"index/{_INDEX_BASE - job.started_at:013d}-{job.id}", b"")
        # a submission saves the job queued, its steps running, its end a final status: the marker of an
        # unfinished job is written at the first and dropped at the last, never touched by a step's write.
        # A cancelled job keeps it until reconciliation has seen its last step end (`settle_unfinished`).
        if job.status == "queued":
            self.backend.write(f"unfinished/{job.id}", b"")
        elif job.status in FINAL_JOB_STATUSES and job.status != "cancelled":
            self.backend.delete_tree(f"unfinished/{job.id}")

    def load_job(self, job_id: str) -> Job | None:
        return self._load(f"{self._job(job_id)}/job.json", Job)

    def job_exists(self, job_id: str) -> bool:
        return bool(self.backend.list(self._job(job_id)))

    def delete_job(self, job_id: str) -> None:
        """Remove every trace of a job (used when its enqueue failed, so nothing is left half-written)."""
        job = None
        with contextlib.suppress(StoreError):
            job = self.load_job(job_id)
        if job is not None:
            self.backend.delete_tree(f"index/{_INDEX_BASE - job.started_at:013d}-{job.id}")
        self.backend.delete_tree(f"unfinished/{check_id(job_id, 'job id')}")
        self.backend.delete_tree(self._job(job_id))

    def list_unfinished(self) -> list[str]:
        """Ids of the jobs saved queued or running, or cancelled and not settled, without reading any record
        (a job can have moved on since: read its record before acting on it)."""
        return sorted(self.backend.list("unfinished"))

    def settle_unfinished(self, job_id: str) -> None:
        self.backend.delete_tree(f"unfinished/{check_id(job_id, 'job id')}")

    def _indexed_ids(self) -> Iterator[str]:
        """Job ids newest first, from the index names alone (no record is read)."""
        seen: set[str] = set()
        for name in sorted(self.backend.list("index")):
            job_id = name.partition("-")[2]
            if job_id and job_id not in seen:
                seen.add(job_id)
                yield job_id

    def list_jobs(self, limit: int | None = None) -> Listing:
        """Jobs newest first. Reads only the records it returns; damaged ones are named, not fatal."""
        ids = list(self._indexed_ids())
        indexed = set(ids)
        # jobs without an index marker (written by Perstack itself) are read and merged in by startedAt
        unindexed = [j for j in self.backend.list("jobs") if j not in indexed]
        jobs: list[Job] = []
        problems: list[str] = []
        wanted = None if limit is None else limit + len(unindexed)
        for job_id in unindexed + ids:
            if wanted is not None and len(jobs) >= wanted:
                break
            try:
                job = self.load_job(job_id)
            except (StoreError, ValueError) as e:
                problems.append(str(e))
                continue
            if job is not None:
                jobs.append(job)
        jobs.sort(key=lambda j: j.started_at, reverse=True)
        return Listing(jobs=jobs[:limit], problems=problems, total=len(ids) + len(unindexed))

    def latest_job(self) -> Job | None:
        listing = self.list_jobs(limit=1)
        return listing.jobs[0] if listing.jobs else None

    # --- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.backend.write(self._checkpoint(checkpoint.job_id, checkpoint.id), checkpoint.to_json().encode())

    def load_checkpoint(self, job_id: str, checkpoint_id: str) -> Checkpoint | None:
        return self._load(self._checkpoint(job_id, checkpoint_id), Checkpoint)

    def checkpoint_exists(self, job_id: str, checkpoint_id: str) -> bool:
        return self.backend.read(self._checkpoint(job_id, checkpoint_id)) is not None

    def list_checkpoints(self, job_id: str) -> tuple[list[Checkpoint], list[str]]:
        """Checkpoints by step number, and the names of damaged files that were skipped."""
        folder = f"{self._job(job_id)}/checkpoints"
        checkpoints: list[Checkpoint] = []
        problems: list[str] = []
        for name in self.backend.list(folder):
            if not name.endswith(".json"):
                continue
            try:
                cp = self._load(f"{folder}/{name}", Checkpoint)
            except StoreError as e:
                problems.append(str(e))
                continue
            if cp is not None:
                checkpoints.append(cp)
        checkpoints.sort(key=lambda c: c.step_number)
        return checkpoints, problems

    # --- runs ---------------------------------------------------------------------------------------

    def save_run_setting(self, setting: RunSetting) -> None:
        key = f"{self._run(setting.job_id, setting.run_id)}/run-setting.json"
        self.backend.write(key, setting.to_json().encode())

    def load_run_setting(self, job_id: str, run_id: str) -> RunSetting | None:
        return self._load(f"{self._run(job_id, run_id)}/run-setting.json", RunSetting)

    def list_runs(self, job_id: str) -> list[str]:
        return self.backend.list(f"{self._job(job_id)}/runs")

    def save_initial_checkpoint(self, checkpoint: Checkpoint) -> None:
        key = f"{self._run(checkpoint.job_id, checkpoint.run_id)}/initial-checkpoint.json"
        self.backend.write(key, checkpoint.to_json().encode())

    def load_initial_checkpoint(self, job_id: str, run_id: str) -> Checkpoint | None:
        return self._load(f"{self._run(job_id, run_id)}/initial-checkpoint.json", Checkpoint)

    # --- events -------------------------------------------------------------------------------------

    def append_events(self, job_id: str, run_id: str, events: list[Event]) -> None:
        self.append_event_lines(job_id, run_id, [e.to_json() for e in events])

    def append_event_lines(self, job_id: str, run_id: str, lines: list[str]) -> None:
        """Append events already serialized (a worker serializes each once, for the store and Redis)."""
        if lines:
            data = "".join(line + "\n" for line in lines).encode()
            self.backend.append(f"{self._run(job_id, run_id)}/events.jsonl", data)

    def read_events(self, job_id: str, run_id: str) -> tuple[list[Event], list[str]]:
        key = f"{self._run(job_id, run_id)}/events.jsonl"
        data = self.backend.read(key)
        events: list[Event] = []
        problems: list[str] = []
        if data:
            for n, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    events.append(Event.model_validate_json(line))
                except ValidationError:
                    problems.append(f"damaged line {n} in {self.backend.describe(key)}")
        return events, problems

    def drop_events_from_step(self, job_id: str, run_id: str, step_number: int) -> None:
        """Forget the events a crashed attempt of a step left behind, before the step runs again."""
        events, _ = self.read_events(job_id, run_id)
        kept = [e for e in events if e.step_number is None or e.step_number < step_number]
        if len(kept) != len(events):
            data = "".join(e.to_json() + "\n" for e in kept).encode()
            self.backend.write(f"{self._run(job_id, run_id)}/events.jsonl", data)

    # --- fan-in: results of parallel delegates, one file each -------------------------------------

    def _fan_in(self, job_id: str, checkpoint_id: str) -> str:
        return f"{self._job(job_id)}/fan-in/{check_id(checkpoint_id, 'checkpoint id')}"

    def save_fan_in_result(self, job_id: str, checkpoint_id: str, tool_call_id: str, data: bytes) -> None:
        # tool call ids come from providers: the file is named by a digest of the id, never the id itself
        name = derived_id("fan-in", tool_call_id)
        self.backend.write(f"{self._fan_in(job_id, checkpoint_id)}/{name}.json", data)

    def load_fan_in_results(self, job_id: str, checkpoint_id: str) -> list[bytes]:
        folder = self._fan_in(job_id, checkpoint_id)
        found = (self.backend.read(f"{folder}/{name}") for name in self.backend.list(folder))
        return [data for data in found if data is not None]
