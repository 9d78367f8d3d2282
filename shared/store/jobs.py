"""The job store: Perstack's on-disk layout, with each message stored once and one committer per step.

    jobs/{jobId}/job.json
    jobs/{jobId}/checkpoints/{checkpointId}.json        every Perstack field but `messages`: a messagesRef
    jobs/{jobId}/runs/{runId}/run-setting.json
    jobs/{jobId}/runs/{runId}/initial-checkpoint.json   perq: where a run segment starts (startRun's)
    jobs/{jobId}/runs/{runId}/messages.jsonl            perq: the run's messages, one chunk per step
    jobs/{jobId}/runs/{runId}/events.jsonl              perq: one line per event, tagged with its attempt
    index/{inverted startedAt}-{jobId}                  perq: empty markers, newest job first by name
    unfinished/{jobId}                                  perq: empty markers of jobs queued, running, or
                                                        cancelled with a step perhaps still running

Why messages live apart from checkpoints: a checkpoint that repeats the whole conversation makes a job's
bytes grow with the square of its length (a 200-step job that reads a 2 KB file per step left 165 MB for
0.55 MB of conversation). Here a step appends only the messages it added, as one chunk that names the chunk
it follows, and the checkpoint names its last chunk; a continuation or a branch names its base conversation
the same way instead of copying it. Readers get whole checkpoints: `load_checkpoint` follows the chain.
Checkpoints written with their messages inline (older perq, Perstack) load as they are, and so do the
rest of a store Perstack wrote (shared/perstack_layout.py): events one per file, records without a head.

Why a step's commit is create-only: a worker can pause past its lease (GC, VM migration, SIGSTOP) and
wake up still running a step that another worker has finished. The checkpoint file is the commit point and
is created only if absent (a hard link locally, a conditional PUT on S3); the attempt that loses finds the
winner's checkpoint and adopts it. The messages chunk and the events an attempt appends before its commit
carry the attempt's token, and readers keep only the token the checkpoint names, so a losing or crashed
attempt's writes are never read.

Paths are built only from ids checked by `check_id`, so no id from a payload or the command line can leave
the store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from shared import perstack_layout
from shared.models import (
    FINAL_JOB_STATUSES,
    MESSAGE_PART_TYPES,
    Checkpoint,
    Event,
    Job,
    Message,
    MessagesRef,
    RunSetting,
    check_id,
    checkpoint_id,
    derived_id,
    misfit,
    read_event,
)
from shared.store.backend import Append, Backend, Offload, Steps, StoreError
from shared.store.local import LocalBackend

T = TypeVar("T", Job, Checkpoint, RunSetting)
_INDEX_BASE = 10**13  # startedAt in ms stays below this until the year 2286

log = logging.getLogger("perq.store")
_TORN_READS = 3  # how often a record that cannot be parsed is read again (`_read_record`)
_MESSAGES = TypeAdapter(list[Message])


def open_backend(location: str, *, fsync: bool = True) -> Backend:
    """A store location: a local path (default ./perstack), or s3://bucket/prefix (`s3.py`)."""
    if location.startswith("s3://"):
        from shared.store.s3 import S3Backend  # s3fs is an optional extra, imported only when used

        return S3Backend.from_url(location)
    return LocalBackend(Path(location).expanduser().resolve(), fsync=fsync)


@dataclass
class Listing:
    jobs: list[Job]
    problems: list[str]  # damaged records, by name, that the listing skipped
    total: int


@dataclass
class _Chunk:
    prev: MessagesRef | None
    raw: list[Any]
    messages: list[Message] | None = None  # validated on first use


@dataclass
class MessageReader:
    """Resolves message refs, reading each run's log once however many checkpoints it serves."""

    store: JobStore
    job_id: str
    _logs: dict[str, dict[str, _Chunk]] = field(default_factory=dict)
    _resolved: dict[tuple[str, str], list[Message]] = field(default_factory=dict)

    def _log(self, run_id: str) -> dict[str, _Chunk]:
        log = self._logs.get(run_id)
        if log is None:
            log = self._logs[run_id] = {}
            data = self.store.backend.read(f"{self.store._run(self.job_id, run_id)}/messages.jsonl")
            for line in (data or b"").splitlines():
                try:
                    raw = json.loads(line)
                    prev = MessagesRef.model_validate(raw["prev"]) if raw.get("prev") else None
                    log[raw["token"]] = _Chunk(prev=prev, raw=raw["messages"])
                except (ValueError, KeyError, TypeError, ValidationError):
                    continue  # a torn last line (a crash mid-append): no checkpoint refers to it
        return log

    def messages(self, ref: MessagesRef | None) -> list[Message]:
        """The conversation `ref` names, oldest message first: one walk of the chain, one list built."""
        chain: list[tuple[tuple[str, str], _Chunk]] = []
        base: list[Message] = []
        while ref is not None:
            key = (ref.run_id, ref.token)
            if key in self._resolved:
                base = self._resolved[key]
                break
            chunk = self._log(ref.run_id).get(ref.token)
            if chunk is None:
                log = f"{self.store._run(self.job_id, ref.run_id)}/messages.jsonl"
                where = self.store.backend.describe(log)
                raise StoreError(f"damaged message log {where}: chunk {ref.token} is missing")
            chain.append((key, chunk))
            ref = chunk.prev
        if not chain:
            return base
        result = list(base)
        for key, chunk in reversed(chain):
            if chunk.messages is None:
                try:
                    chunk.messages = _MESSAGES.validate_python(chunk.raw)
                except ValidationError as e:
                    raise StoreError(f"damaged message chunk {key[1]} of run {key[0]}: {e}") from e
            result.extend(chunk.messages)
        self._resolved[chain[0][0]] = result  # only the asked-for conversation: one list per answer
        return result


class JobStore:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    def open(cls, location: str, *, fsync: bool = True) -> JobStore:
        return cls(open_backend(location, fsync=fsync))

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
        return self._parse(key, data, model)

    def _parse(self, key: str, data: bytes, model: type[T]) -> T:
        try:
            return model.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(f"damaged file {self.backend.describe(key)}: {e.errors()[0]['msg']}") from e

    # --- jobs ---------------------------------------------------------------------------------------

    def save_job(self, job: Job, *, new: bool = False) -> None:
        """Write a new job record (`new`), or its next version under the record's lock."""
        self.backend.run(self._save_job_steps(job, new=True) if new else self._locked_save(job))

    def _locked_save(self, job: Job) -> Steps[None]:
        key = self._job_key(job.id)
        lock = yield from self.backend.lock_steps(key)
        try:  # overwritten whole, whatever it holds (tools, tests), by one writer at a time all the same
            while True:
                replacing = self.backend.read(key)
                if (yield from self._save_job_steps(job, replacing=replacing, past_lock=lock is None)):
                    return
        finally:
            self.backend.unlock(lock)

    def _save_job_steps(
        self, job: Job, *, new: bool = False, replacing: bytes | None = None, past_lock: bool = False
    ) -> Steps[bool]:
        """Write the record: a new one, or (the caller holding its lock, or past it) its next version, only
        if the record still holds `replacing` when given (`rewrite_steps`): False when it did not."""
        data = job.model_dump_json(by_alias=True, indent=2, exclude_none=True).encode()
        key = self._job_key(job.id)
        if new:
            # the job's steps create only their checkpoints: its folder for them, and the record's spare
            self.backend.lay_out(folders=[f"{self._job(job.id)}/checkpoints"], rewritten=[key])
            self.backend.write(key, data)
            self.backend.mark(f"index/{_INDEX_BASE - job.started_at:013d}-{job.id}")
        elif not (yield from self.backend.rewrite_steps(key, data, replacing=replacing, past_lock=past_lock)):
            return False
        # a submission saves the job queued, its steps running, its end a final status: the marker of an
        # unfinished job is written at the first and dropped at the last, never touched by a step's write.
        # A cancelled job keeps it until reconciliation has seen its last step end (`settle_unfinished`).
        if job.status == "queued":
            yield Offload(functools.partial(self.backend.mark, f"unfinished/{job.id}"))
        elif job.status in FINAL_JOB_STATUSES and job.status != "cancelled":
            yield from self.backend.removal_steps(f"unfinished/{job.id}")
        return True

    def _job_key(self, job_id: str) -> str:
        return f"{self._job(job_id)}/job.json"

    def update_job(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        """Read, change and write the job record as one step against other writers on this machine.

        `change` returns the record to write (a copy: the record it is given must stay as read, as the rules
        of shared/job_record.py leave it), or None to leave it as it is. Returns what the store holds
        afterwards (None for a job without a record). On S3 the read and write are not isolated from
        another machine's; the rules in shared/job_record.py keep a late writer from moving a job back.
        """
        return self.backend.run(self.update_job_steps(job_id, change))

    def update_job_steps(self, job_id: str, change: Callable[[Job], Job | None]) -> Steps[Job | None]:
        key = self._job_key(job_id)
        lock = yield from self.backend.lock_steps(key)
        try:
            while True:
                read = self._read_record(key, self.backend.read)
                if read is None:
                    return None
                data, job = read
                changed = change(job)  # a copy, or None (`change` never changes what it is given)
                if changed is None:
                    return job
                if (yield from self._save_job_steps(changed, replacing=data, past_lock=lock is None)):
                    return changed
                # written meanwhile past the lock (this writer held it, stopped; or both are past it): the
                # change is made again on what was written, or refused by the rules if the job moved on
                log.info("the record of job %s changed while it was being updated; updating it again", job_id)
        finally:
            self.backend.unlock(lock)

    def load_job(self, job_id: str) -> Job | None:
        # read under the record's lock, shared: a rewrite changes a spare file in place (`rewrite_steps`)
        read = self._read_record(self._job_key(job_id), self.backend.read_shared)
        return None if read is None else read[1]

    def _read_record(self, key: str, read: Callable[[str], bytes | None]) -> tuple[bytes, Job] | None:
        """A job record, as read and parsed. One that does not parse is read again a few times: a read past
        the record's lock (`lock_steps`, `read_shared`) can meet a spare that the lock's holder is rewriting,
        as the record was swapped out under the reader."""
        for attempt in range(_TORN_READS + 1):
            data = read(key)
            if data is None:
                return None
            try:
                return data, self._parse(key, data, Job)
            except StoreError:
                if attempt == _TORN_READS:
                    raise
        raise AssertionError("unreachable")

    def head_checkpoint_id(self, job: Job) -> str | None:
        """The checkpoint a continuation of `job` resumes: the one its record names, or for a record Perstack
        wrote (which names none) the coordinator's latest, found among the job's checkpoints."""
        if not perstack_layout.lacks_head(job):
            return job.head_checkpoint_id
        checkpoints, _ = self.list_checkpoints(job.id, messages=False)
        return perstack_layout.head_checkpoint_id(job, checkpoints)

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

    # --- messages -----------------------------------------------------------------------------------

    def _stored_form(self, cp: Checkpoint, token: str, appends: list[Append] | None = None) -> bytes:
        """The checkpoint as its file holds it: the messages it added since its ref go to its run's log
        (as the chunk `token`; appended now, or added to `appends` for the caller to write), and the file
        names the log instead of holding them."""
        ref = cp.messages_ref
        known = ref.count if ref is not None else 0
        if len(cp.messages) < known:
            raise ValueError(f"checkpoint {cp.id} holds fewer messages than its ref names: not saved")
        if len(cp.messages) > known:
            new = cp.messages[known:]
            head = {"token": token, "prev": ref.to_dict() if ref else None, "count": len(cp.messages)}
            line = json.dumps(head)[:-1].encode() + b', "messages": '
            line += _MESSAGES.dump_json(new, by_alias=True, exclude_none=True) + b"}\n"
            chunk = Append(f"{self._run(cp.job_id, cp.run_id)}/messages.jsonl", line, cp.step_number)
            if appends is None:
                self.backend.append(chunk.key, chunk.data, chunk.order)
            else:
                appends.append(chunk)
            ref = MessagesRef(run_id=cp.run_id, token=token, count=len(cp.messages))
            cp.messages_ref = ref
        data: bytes = cp.model_dump_json(by_alias=True, exclude_none=True, exclude={"messages"}).encode()
        return data

    def _with_messages(
        self, key: str, data: bytes, reader: MessageReader | None, messages: bool
    ) -> Checkpoint:
        cp = self._parse(key, data, Checkpoint)
        return self.with_messages(cp, reader) if messages else cp

    def with_messages(self, cp: Checkpoint, reader: MessageReader | None = None) -> Checkpoint:
        """A checkpoint read without its messages (`messages=False`), with them read from the logs."""
        if not cp.messages and cp.messages_ref is not None:
            cp.messages = (reader or MessageReader(self, cp.job_id)).messages(cp.messages_ref)
        return cp

    # --- checkpoints --------------------------------------------------------------------------------

    def commit_checkpoint(self, checkpoint: Checkpoint, token: str, event_lines: Sequence[str] = ()) -> bool:
        """Commit the step that ends with `checkpoint`: its events (serialized already) and new messages are
        appended under the attempt's `token`, then the checkpoint is created unless it exists. False when
        another attempt of the step committed first (this one must then discard its result and adopt the
        winner's; readers never see what it appended)."""
        return self.backend.run(self.commit_checkpoint_steps(checkpoint, token, event_lines))

    def commit_checkpoint_steps(
        self, checkpoint: Checkpoint, token: str, event_lines: Sequence[str] = ()
    ) -> Steps[bool]:
        """`commit_checkpoint` as steps, to compose with the writes that follow it (the job record)."""
        checkpoint.commit = token
        appends: list[Append] = []
        if event_lines:
            appends.append(
                self._step_events(
                    checkpoint.job_id, checkpoint.run_id, checkpoint.step_number, list(event_lines), token
                )
            )
        data = self._stored_form(checkpoint, token, appends)
        return (
            yield from self.backend.commit_steps(
                appends, self._checkpoint(checkpoint.job_id, checkpoint.id), data
            )
        )

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write a checkpoint whatever is there (tools, tests; a step commits with `commit_checkpoint`)."""
        data = self._stored_form(checkpoint, secrets.token_hex(8))
        self.backend.write(self._checkpoint(checkpoint.job_id, checkpoint.id), data)

    def load_checkpoint(self, job_id: str, checkpoint_id: str, *, messages: bool = True) -> Checkpoint | None:
        """A whole checkpoint (its messages read from the logs), or without messages when not wanted."""
        return self._load_checkpoint(self._checkpoint(job_id, checkpoint_id), messages)

    def _load_checkpoint(self, key: str, messages: bool) -> Checkpoint | None:
        data = self.backend.read(key)
        return None if data is None else self._with_messages(key, data, None, messages)

    def checkpoint_exists(self, job_id: str, checkpoint_id: str) -> bool:
        return self.backend.read(self._checkpoint(job_id, checkpoint_id)) is not None

    def list_checkpoints(self, job_id: str, *, messages: bool = True) -> tuple[list[Checkpoint], list[str]]:
        """Checkpoints by step number, and the names of damaged files that were skipped."""
        folder = f"{self._job(job_id)}/checkpoints"
        reader = MessageReader(self, job_id)
        checkpoints: list[Checkpoint] = []
        problems: list[str] = []
        for name in self.backend.list(folder):
            if not name.endswith(".json"):
                continue
            key = f"{folder}/{name}"
            try:
                data = self.backend.read(key)
                if data is not None:
                    checkpoints.append(self._with_messages(key, data, reader, messages))
            except StoreError as e:
                problems.append(str(e))
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
        run = self._run(checkpoint.job_id, checkpoint.run_id)
        key = f"{run}/initial-checkpoint.json"
        self.backend.lay_out(logs=[f"{run}/events.jsonl", f"{run}/messages.jsonl"])  # the run's logs, empty
        checkpoint.commit = None  # a run's starting point is written by whoever starts the run, not committed
        self.backend.write(key, self._stored_form(checkpoint, secrets.token_hex(8)))

    def load_initial_checkpoint(
        self, job_id: str, run_id: str, *, messages: bool = True
    ) -> Checkpoint | None:
        return self._load_checkpoint(f"{self._run(job_id, run_id)}/initial-checkpoint.json", messages)

    # --- events -------------------------------------------------------------------------------------

    def append_events(self, job_id: str, run_id: str, events: list[Event]) -> None:
        """Append events as they are (no attempt token: always read). Steps use `append_step_events`."""
        if events:
            data = "".join(e.to_json() + "\n" for e in events).encode()
            self.backend.append(f"{self._run(job_id, run_id)}/events.jsonl", data, events[0].step_number or 0)

    def _step_events(
        self, job_id: str, run_id: str, step_number: int, lines: list[str], token: str
    ) -> Append:
        """One attempt's events of a step, serialized already; each line carries the attempt's token, and
        readers keep them only if that attempt committed the step's checkpoint."""
        tag = f',"commit":"{token}"}}\n'
        # the job and run are the file's: read_events puts them back
        where = f',"jobId":"{job_id}","runId":"{run_id}"'
        data = "".join(line.replace(where, "", 1)[:-1] + tag for line in lines).encode()
        return Append(f"{self._run(job_id, run_id)}/events.jsonl", data, step_number)

    def append_step_events(
        self, job_id: str, run_id: str, step_number: int, lines: list[str], token: str
    ) -> None:
        """Append one attempt's events of a step without committing it (its checkpoint comes later)."""
        if lines:
            events = self._step_events(job_id, run_id, step_number, lines, token)
            self.backend.append(events.key, events.data, events.order)

    def read_events(self, job_id: str, run_id: str) -> tuple[list[Event], list[str]]:
        """A run's events in order, each as its own type: those of committed attempts, and untagged ones
        (older stores, and Perstack's, one file per event). What a line leaves out is put back before the line
        is read into its type: a step-ending event's checkpoint from its file, in place of the id the line
        holds; finishToolCall's tool results from the resolveToolResults before it.

        Reading is tolerant: an event of a type perq does not know, or one that does not fit its type, is
        kept as an `UnknownEvent` (the latter is also named among the problems); only a line that is no
        event at all is skipped, and named."""
        folder = self._run(job_id, run_id)
        key = f"{folder}/events.jsonl"
        data = self.backend.read(key)
        if data is None:  # no log: a run Perstack wrote (the folder is listed only then)
            events, problems = perstack_layout.read_event_files(
                self.backend.list(folder),
                lambda name: self.backend.read(f"{folder}/{name}"),
                lambda name: self.backend.describe(f"{folder}/{name}"),
            )
            return events, problems + _misfits(events)
        lines: list[tuple[int, dict[str, Any]]] = []
        problems = []
        # lines a step wrote leave out the job and run ids; in a line that has them, they win (last key)
        where = b'{"jobId":"%s","runId":"%s",' % (job_id.encode(), run_id.encode())
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                parsed = json.loads(where + line[1:])
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                lines.append((n, parsed))
            else:
                problems.append(f"damaged line {n} in {self.backend.describe(key)}")
        files: dict[str, dict[str, Any] | None] = {}

        def checkpoint_file(checkpoint_id: str) -> dict[str, Any] | None:
            if checkpoint_id not in files:
                raw = self.backend.read(self._checkpoint(job_id, checkpoint_id))
                try:
                    files[checkpoint_id] = json.loads(raw) if raw is not None else None
                except ValueError:
                    files[checkpoint_id] = None
            return files[checkpoint_id]

        kept: list[tuple[int, dict[str, Any]]] = []
        for n, line_data in lines:
            token = line_data.pop("commit", None)  # the store's, not the event's
            step_number = line_data.get("stepNumber")
            if token is not None and isinstance(step_number, int):
                committed = checkpoint_file(checkpoint_id(run_id, step_number)) or {}
                if committed.get("commit") != token:
                    continue  # an attempt that lost the step's commit, died before it, or is still running
            named = line_data.get("checkpoint")
            if isinstance(named, dict) and list(named) == ["id"]:
                found = checkpoint_file(str(named["id"]))
                if found is None:
                    problems.append(
                        f"event {line_data.get('id')} names checkpoint {named['id']}, which is missing"
                    )
                else:
                    line_data["checkpoint"] = {k: v for k, v in found.items() if k != "commit"}
            kept.append((n, line_data))
        _with_derived_messages([line_data for _, line_data in kept])
        events = []
        for n, line_data in kept:
            try:
                events.append(read_event(line_data))
            except ValidationError:
                problems.append(f"damaged line {n} in {self.backend.describe(key)}")
        return events, problems + _misfits(events)

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


def _misfits(events: list[Event]) -> list[str]:
    """The events read as they are although perq knows their type (readers print these as "skipped …")."""
    return [
        f"typing event {e.id} ({e.type}, step {e.step_number}): it does not fit perq's model of its type and"
        " is shown as written"
        for e in events
        if misfit(e)
    ]


def _with_derived_messages(lines: list[dict[str, Any]]) -> None:
    """Fill each finishToolCall's tool message with the results of the step's resolveToolResults, as the
    loop made it: the results are stored once, in resolveToolResults."""
    results: dict[tuple[Any, Any], dict[Any, Any]] = {}
    for line in lines:
        where = (line.get("runId"), line.get("stepNumber"))
        if line.get("type") == "resolveToolResults":
            by_call = {r.get("id"): r for r in line.get("toolResults") or [] if isinstance(r, dict)}
            results[where] = by_call
        elif line.get("type") == "finishToolCall":
            by_call = results.get(where, {})
            for message in line.get("newMessages") or []:
                for part in message.get("contents") or [] if isinstance(message, dict) else []:
                    if isinstance(part, dict) and "contents" not in part:
                        found = by_call.get(part.get("toolCallId"), {}).get("result") or []
                        part["contents"] = [p for p in found if p.get("type") in MESSAGE_PART_TYPES]
