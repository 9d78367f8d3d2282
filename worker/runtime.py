"""What a worker does with one step task: load, run the step, commit it, then hand the job on.

Order inside a step, and why:
  1. a checkpoint that already exists for (run, step) means an attempt finished the step: adopt it, skip to 4;
  2. run the step in memory (a model answer with tool calls is sent to the journal at once; a tool that may
     change anything waits for the record, and so does the commit: awaited before the commit gate);
  3. commit: append the step's events and its new messages, tagged with this attempt's token, then create
     the step's checkpoint only if it does not exist. That create is the commit point and has exactly one
     winner; an attempt that loses (it paused past its lease while another worker ran the step) discards
     its result, publishes nothing, and adopts the winner's checkpoint as in 1;
  4. record the step in the job record (shared/job_record.py: forward only), and hand on: enqueue the next
     step, start delegates, resume a parent, or finish the job (worker/handon.py). A record that only
     refreshes a running job's totals is written just after the hand-over instead (`_refresh_due`).
Every action in 4 is idempotent, so an attempt that dies anywhere can simply be run again.

Store calls go through `io`: where they block (S3's round trips, a local disk's flushes) they run on a
thread pool, so a worker's hundreds of concurrent steps do not wait on each other's; a local store without
fsync runs them inline, which measures faster than a thread hop. Small reads of a bounded size (a run
setting, whether a checkpoint exists) go through `read`, inline wherever they do not wait on a network: a
local read of a small file costs less than the hop. A read that may parse a whole conversation (a starting
point, a checkpoint with its messages) stays on `io`, so a long job's log never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from shared import job_record
from shared.events import live_lines
from shared.models import (
    FINAL_JOB_STATUSES,
    Checkpoint,
    Job,
    RunError,
    RunSetting,
    checkpoint_id,
    now_ms,
)
from shared.queue import StepTask
from shared.randomness import random_token
from shared.store import JobStore
from shared.store.backend import Offload, Steps
from shared.store.flush import LoopFlush
from shared.store.local import Aside, LocalBackend
from worker.gate import Gate, Slot
from worker.handon import HandOn
from worker.journal import QueueAnswerJournal
from worker.loop import AnswerJournal, StepRunner
from worker.models.contract import ModelClient
from worker.models.select import get_model_client
from worker.skills.base import ToolContext
from worker.skills.scope import SkillScope, set_skill_scope
from worker.skills.toolset import SkillPool, build_skill_set
from worker.step_queue import HandOver, StepQueue

log = logging.getLogger("perq.worker")
P = ParamSpec("P")
R = TypeVar("R")
# threads for a blocking store's calls: each concurrent step holds one while it waits on the store
STORE_THREADS = 64
# steps of one worker process that commit and hand over at once (worker/gate.py): 16 and 32 measured alike
# for 500 waiting jobs (5.8 s, ungated 6.4 s), 64 slower; a job-throughput run of instant one-step jobs pays
# for the gate (about 1100 jobs/s, ungated up to 1400), as its steps never wait on a model
COMMITTING_AT_ONCE = 16
# a step that ran this long since it found its checkpoint missing looks again before it commits (a file read
# per step saved for the others: a step's commit is still create-only, whoever looks)
LOOK_AGAIN_AFTER_S = 1.0
# the collector's thresholds (young, middle, old generation) while a process runs steps: `collector_for_steps`
GC_THRESHOLDS = (50_000, 50, 100)


@contextlib.contextmanager
def collector_for_steps() -> Iterator[None]:
    """The garbage collector as a process that runs steps wants it; on exit its thresholds are put back and
    everything frozen is unfrozen. A worker runs inside it; so does the bench's in-process baseline, so that
    the two differ only in the queue.

    What exists when it begins (modules, the skill pool) lives as long as the process: it is frozen out of
    the collector's full passes, which each step's allocations trigger (a worker's steps/s in the step
    handoff figure: +15%, measured before its baseline had these settings too). A step
    allocates thousands of short-lived objects (models, events, JSON): at Python's default of a young
    collection every 700 allocations the collector took ~15% of a worker's CPU (bench: concurrency, 8.5 ->
    7.2 s for 5000 steps), with the same peak RSS."""
    gc.collect()
    gc.freeze()
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@functools.lru_cache(maxsize=256)
def _workspace(folder: str) -> Path:
    """A run's workspace as a path, made once per folder (pathlib's parse is a step's cost for nothing)."""
    return Path(folder)


class Unknown(enum.Enum):
    """Nothing was read ahead: the step asks the queue itself."""

    TOKEN = 0


UNKNOWN = Unknown.TOKEN


@dataclass
class Runtime:
    """A worker's state: the store, caches, and how to reach the queue."""

    store: JobStore
    queue: StepQueue
    pool: SkillPool | None = None
    env: dict[str, str] = field(default_factory=dict)
    # how often a worker rewrites a running job's record just to refresh its totals (status changes and
    # the ends of runs are always written at once)
    record_interval_s: float = 1.0
    _settings: OrderedDict[str, RunSetting] = field(default_factory=OrderedDict)
    _checkpoints: OrderedDict[str, Checkpoint] = field(default_factory=OrderedDict)
    _recorded_at: dict[str, tuple[int, float]] = field(default_factory=dict)  # job: (epoch, when)
    _models: dict[tuple[str, str], ModelClient] = field(default_factory=dict)
    _executor: ThreadPoolExecutor | None = None
    _flusher: LoopFlush | None = None
    _gate: Gate = field(default_factory=lambda: Gate(COMMITTING_AT_ONCE))

    def __post_init__(self) -> None:
        if self.store.backend.blocking and self._executor is None:
            self._executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="perq-store")
        backend = self.store.backend
        if isinstance(backend, LocalBackend) and backend.flushes_shared:
            self._flusher = LoopFlush(backend.flush_group)
        self.hand_on = HandOn(self.store, self.run_setting, self.checkpoint)

    async def io(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a store call: on the store's threads where calls block, else inline."""
        if self._executor is None:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs)
        )

    async def read(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a store call that only reads a small file: inline unless the store's reads block, else as
        `io`. Never for a read whose size grows with the conversation."""
        if not self.store.backend.blocking_reads:
            return fn(*args, **kwargs)
        return await self.io(fn, *args, **kwargs)

    async def run(self, steps: Steps[R], aside: Aside | None = None) -> R:
        """Run a store write's steps (`Steps`): on the event loop where the store's flushes can be shared
        (a local disk with syncfs: only the flush leaves the loop, each wait inside `aside`), else as `io`."""
        if self._flusher is not None:
            assert isinstance(self.store.backend, LocalBackend)
            return await self.store.backend.run_async(steps, self._flusher, self._executor, aside)
        return await self.io(self.store.backend.run, steps)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self._flusher is not None:
            self._flusher.close()

    # --- caches (called inline or from the store's threads) -----------------------------------------

    def run_setting(self, job_id: str, run_id: str) -> RunSetting:
        setting = self._settings.get(run_id)
        if setting is None:
            setting = self.store.load_run_setting(job_id, run_id)
            if setting is None:
                raise LookupError(f"run {run_id} of job {job_id} has no run setting")
            self._settings[run_id] = setting
            if len(self._settings) > 2048:
                self._settings.popitem(last=False)
        return setting

    def remember(self, checkpoint: Checkpoint) -> None:
        """Keep a committed checkpoint: its run's next step most often runs here too."""
        self._checkpoints[checkpoint.id] = checkpoint
        if len(self._checkpoints) > 1024:
            self._checkpoints.popitem(last=False)

    def checkpoint(self, job_id: str, checkpoint_id: str) -> Checkpoint | None:
        # a checkpoint id names one immutable, committed state, so a kept copy is as good as the file
        return self._checkpoints.get(checkpoint_id) or self.store.load_checkpoint(job_id, checkpoint_id)

    async def _cached_run_setting(self, job_id: str, run_id: str) -> RunSetting:
        """`run_setting`, with a hit in this worker's cache answered at once instead of on a store thread."""
        setting = self._settings.get(run_id)
        return setting if setting is not None else await self.read(self.run_setting, job_id, run_id)

    async def _cached_checkpoint(self, job_id: str, checkpoint_id: str) -> Checkpoint | None:
        """`checkpoint`, with a hit in this worker's cache answered at once; otherwise its file (small: its
        messages are in the logs) is a small read, which most often finds none (has this step been done?),
        and the conversation of one that exists is read on a store thread."""
        cached = self._checkpoints.get(checkpoint_id)
        if cached is not None:
            return cached
        stored = await self.read(self.store.load_checkpoint, job_id, checkpoint_id, messages=False)
        return None if stored is None else await self.io(self.store.with_messages, stored)

    def model(self, setting: RunSetting) -> ModelClient:
        key = (setting.provider_config.to_json(), setting.model)
        client = self._models.get(key)
        if client is None:
            client = self._models[key] = get_model_client(setting.provider_config, setting.model)
        return client

    # --- one step -----------------------------------------------------------------------------------

    async def run_step(
        self, task: StepTask, *, attempt: int = 1, cancel_mark: int | Unknown | None = UNKNOWN
    ) -> Checkpoint | None:
        """Run one step. `cancel_mark`: the job's cancel mark when the worker read it at pick-up."""
        setting = await self._cached_run_setting(task.job_id, task.run_id)
        this = checkpoint_id(task.run_id, task.step_number)
        looked = time.monotonic()
        done = await self._cached_checkpoint(task.job_id, this)
        if done is not None:
            log.info("step %s of run %s already done; handing on", task.step_number, task.run_id)
            return await self._adopt(setting, done)
        if cancel_mark is UNKNOWN:
            cancelled = await self.queue.is_cancelled(task.job_id, setting.epoch)
        else:
            cancelled = cancel_mark is not None and cancel_mark >= setting.epoch
        if cancelled:
            log.info("job %s is cancelled; step %s not run", task.job_id, task.step_number)
            before = checkpoint_id(task.run_id, task.step_number - 1)
            previous = await self._cached_checkpoint(task.job_id, before)
            if previous is not None:  # progress is recorded lazily: the record must show where it stopped
                await self.run(self._record(setting, previous, catch_up=True))
            await self.io(self._settle_cancel, setting)
            return None

        previous = self._checkpoints.get(checkpoint_id(task.run_id, task.step_number - 1))
        if previous is not None:  # kept by this worker, most often: no store thread for it
            start, begins_run = self._continue(previous, task), False
        else:
            start, begins_run = await self._start_of(task)
        journal = QueueAnswerJournal(self.queue, task.run_id, task.step_number, first_attempt=attempt == 1)
        try:
            end, runner = await self._execute(task, setting, start, begins_run, journal)
            # the step's answers are journaled before anything of it is committed (outside the gate: a
            # slow Redis must not hold the places of other jobs' commits)
            await journal.recorded()
        finally:
            journal.abandon()  # a save still on its way when the step ends otherwise (cancelled, interrupted)
        async with self._gate.slot(time.monotonic()) as slot:
            return await self._commit_and_hand_on(task, setting, end, runner, journal, slot, looked)

    async def _commit_and_hand_on(
        self,
        task: StepTask,
        setting: RunSetting,
        end: Checkpoint,
        runner: StepRunner,
        journal: QueueAnswerJournal,
        slot: Slot,
        looked: float,
    ) -> Checkpoint:
        """Commit the step run in memory, then hand its job on (or adopt the attempt that committed first);
        in the gate's `slot`, stepping aside while the store flushes."""
        token = random_token(8)
        lines = [e.to_json() for e in runner.events]
        commit = self._commit_and_finish(setting, end, lines, token, looked)
        committed = await self.run(commit, aside=slot.aside)
        if committed is None:
            # another attempt of this step committed first (this one paused past its lease): its checkpoint
            # is the step's; this attempt's result, events included, is dropped
            log.warning(
                "step %s of run %s was committed by another attempt; adopting it", end.step_number, end.run_id
            )
            winner = await self.io(self.store.load_checkpoint, end.job_id, end.id)
            if winner is None:
                raise LookupError(f"checkpoint {end.id} lost its commit race but cannot be read")
            return await self._adopt(setting, winner)
        tasks, job, refresh = committed
        stopped = not tasks and job is not None and job.status in FINAL_JOB_STATUSES
        handed = HandOver(task.job_id, setting.epoch, live_lines(runner.events), tasks, journal.keys, stopped)
        refused = await self.queue.hand_over(handed)
        if refused:  # cancelled meanwhile: the record shows this step (it may have been written lazily)
            await self.run(self._record(setting, end, catch_up=True))
            await self.io(self._settle_cancel, setting)
        elif refresh:
            await self._refresh_record(setting, end, slot)
        return end

    async def _refresh_record(self, setting: RunSetting, end: Checkpoint, slot: Slot) -> None:
        """Write a refresh of a running job's record after its step handed on (`_refresh_due`). Best effort:
        a later step's record carries the same totals, and a failure raised from here would count as the
        failure of a step that is committed and handed on (on its last try, stopping a job that runs fine)."""
        try:
            await self.run(self._record(setting, end, due=True), aside=slot.aside)
        except Exception as e:
            log.warning(
                "could not refresh the record of job %s after step %s: %r", end.job_id, end.step_number, e
            )

    async def _execute(
        self, task: StepTask, setting: RunSetting, start: Checkpoint, begins_run: bool, journal: AnswerJournal
    ) -> tuple[Checkpoint, StepRunner]:
        """Run the step's loop in memory: nothing is written to the store here."""
        expert = setting.experts[setting.expert_key]
        tool_context = ToolContext(
            workspace=_workspace(setting.workspace),
            store_root=self.store.local_root,
            todos=list(start.todos or []),
            env=self.env,
        )
        runner = StepRunner(setting=setting, expert=expert, journal=journal)
        # skill servers started or heard from during this step report into its events (worker/skills/scope.py)
        set_skill_scope(
            SkillScope(
                runner.events, task.job_id, task.run_id, expert.key, task.step_number, setting.workspace
            )
        )
        try:
            runner.skills = await build_skill_set(
                expert,
                setting.experts,
                coordinator=start.delegated_by is None,
                tool_context=tool_context,
                pool=self.pool,
            )
            runner.model = self.model(setting)
        except Exception as e:  # skills or provider could not be set up: the run stops, saying which
            end = runner.fail(start, RunError(name=type(e).__name__, message=str(e)))
        else:
            end = await runner.run(start, begins_run=begins_run)
        return end, runner

    def _commit_and_finish(
        self, setting: RunSetting, end: Checkpoint, lines: list[str], token: str, looked: float
    ) -> Steps[tuple[list[StepTask], Job | None, bool] | None]:
        """Commit the step; when this attempt won, record it in the job record and prepare what follows.
        Returns the tasks to enqueue, the record (None: not read) and whether the record is to be refreshed
        once the step handed on (`_refresh_due`); None when the step was committed by another attempt.

        As one sequence of steps (`Steps`): where the record is written here, the commit's name (its
        checkpoint) waits for the record's data flush instead of having one of its own; the record is still
        written after the commit point, and every name is on the disk before the step hands on."""
        # looked for again (`looked`: when the step found none) by an attempt that ran long enough, by the
        # monotonic clock, to have paused past its lease, so that such a late attempt most often writes
        # nothing at all; any other (a pause the clock did not count, a race with a late attempt) writes its
        # lines and loses the create-only commit, and readers skip its lines
        late = time.monotonic() - looked >= LOOK_AGAIN_AFTER_S
        if late and self.store.checkpoint_exists(end.job_id, end.id):
            return None
        if not (yield from self.store.commit_checkpoint_steps(end, token, lines)):
            return None
        self.remember(end)
        refresh = self._refresh_due(setting, end)
        job = None if refresh else (yield from self._record(setting, end))
        tasks = self.hand_on.without_writes(end)  # the next step (a read), or nothing
        if tasks is None:  # delegates, a parent's resumption: writes of their own (run settings, starts)
            tasks = yield Offload(functools.partial(self.hand_on.follow_ups, setting, end))
        return tasks, job, refresh

    async def _adopt(self, setting: RunSetting, done: Checkpoint) -> Checkpoint:
        """Hand the job on from a step that is committed already (a re-run, or a lost commit race)."""
        tasks = await self.io(self.hand_on.follow_ups, setting, done)
        # the attempt that finished the step may have died before the job record: catch it up, unless what
        # follows the step has run already (then the record is past this step, or moved on)
        if tasks or done.status != "proceeding":
            await self.run(self._record(setting, done, catch_up=True))
        if await self.queue.hand_over(HandOver(done.job_id, setting.epoch, tasks=tasks)):
            await self.io(self._settle_cancel, setting)
        return done

    async def _start_of(self, task: StepTask) -> tuple[Checkpoint, bool]:
        """`_starting_point`, with a run's first step (most often: a new job) found by a small read of its
        initial checkpoint, whose conversation (a continuation's) alone is read on a store thread."""
        load = self.store.load_initial_checkpoint
        initial = await self.read(load, task.job_id, task.run_id, messages=False)
        if initial is not None and initial.step_number == task.step_number:
            return await self.io(self.store.with_messages, initial) if initial.messages_ref else initial, True
        return await self.io(self._starting_point, task)

    def _starting_point(self, task: StepTask) -> tuple[Checkpoint, bool]:
        """The previous step's checkpoint turned into this step's, or the run's initial checkpoint."""
        previous = self.checkpoint(task.job_id, checkpoint_id(task.run_id, task.step_number - 1))
        if previous is not None:
            return self._continue(previous, task), False
        initial = self.store.load_initial_checkpoint(task.job_id, task.run_id)
        if initial is None or initial.step_number != task.step_number:
            raise LookupError(f"run {task.run_id} has no checkpoint to start step {task.step_number} from")
        return initial, True

    @staticmethod
    def _continue(previous: Checkpoint, task: StepTask) -> Checkpoint:
        """The previous step's checkpoint as this step's start."""
        return previous.model_copy(
            update={"id": checkpoint_id(task.run_id, task.step_number), "step_number": task.step_number}
        )

    # --- the job record -----------------------------------------------------------------------------

    @staticmethod
    def _only_moves_on(setting: RunSetting, end: Checkpoint) -> bool:
        """A step after which its run goes on: its record changes nothing but the totals (and `running`)."""
        return end.status == "proceeding" and not setting.parallel_branch

    def _recent(self, setting: RunSetting, end: Checkpoint, now: float) -> bool:
        epoch, at = self._recorded_at.get(end.job_id, (None, -1e9))
        return epoch == setting.epoch and now - at < self.record_interval_s

    def _refresh_due(self, setting: RunSetting, end: Checkpoint) -> bool:
        """Whether the record of a job whose run goes on is due for a refresh: it is then written after the
        step hands on, not before. Why: such a record only says the job runs and its totals so far, which the
        next step's record says again; before the hand-over its two flushes (the spare's data, the swap) made
        every such step wait on two more flushes of the file system (bench: concurrency). Every other record
        (a run's end, a delegation, a catch-up) is written before, as the rules need. Only on a local disk
        with shared flushes (what it saves), where the record's lock keeps a late refresh from overwriting
        what the next step wrote meanwhile: on S3 a record is read and put without a lock, and the rules can
        refuse a late write only when it reads after the earlier one. Stamped now, so that the next step,
        taken by this worker at once, does not write it a second time meanwhile."""
        now = time.monotonic()
        if self._flusher is None or not self._only_moves_on(setting, end) or self._recent(setting, end, now):
            return False
        self._stamp(end.job_id, setting.epoch, now)
        return True

    def _stamp(self, job_id: str, epoch: int, now: float) -> None:
        self._recorded_at[job_id] = (epoch, now)
        if len(self._recorded_at) > 4096:
            self._recorded_at.clear()

    def _record(
        self, setting: RunSetting, end: Checkpoint, *, catch_up: bool = False, due: bool = False
    ) -> Steps[Job | None]:
        """Record a step's end in the job record (the rules are shared/job_record.py's).

        A step that only moves a running job on rewrites the record at most every `record_interval_s`
        (`due`: the caller decided it is time); every other step writes it. Returns the record as the store
        holds it afterwards (None: not read).
        """
        now = time.monotonic()
        if not (due or catch_up) and self._only_moves_on(setting, end) and self._recent(setting, end, now):
            return None

        def change(job: Job) -> Job | None:
            return job_record.after_step(
                job,
                end,
                epoch=setting.epoch,
                expert_key=setting.expert_key,
                parallel_branch=setting.parallel_branch,
                catch_up=catch_up,
                now=now_ms(),
            )

        job = yield from self.store.update_job_steps(end.job_id, change)
        if job is None:
            raise LookupError(f"job {end.job_id} has no job record")
        if job.status == "running":
            self._stamp(job.id, setting.epoch, now)
        else:
            self._recorded_at.pop(job.id, None)
        return job

    def _settle_cancel(self, setting: RunSetting) -> None:
        self.store.update_job(
            setting.job_id, lambda job: job_record.settle_cancel(job, epoch=setting.epoch, now=now_ms())
        )

    def fail_job(self, task: StepTask, error: Exception) -> None:
        """A step that keeps failing outside the loop: stop its job, saying why. Best effort: the store
        may be the cause."""
        failure = RunError(name=type(error).__name__, message=f"step {task.step_number}: {error}")
        try:
            self.store.update_job(task.job_id, lambda job: job_record.fail(job, failure, now=now_ms()))
        except Exception:
            log.exception("could not record the failure of job %s", task.job_id)
