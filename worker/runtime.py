"""What a worker does with one step task: load, run the step, persist, then hand the job on.

Order inside a step, and why:
  1. a checkpoint that already exists for (run, step) means an earlier attempt finished the step: skip to 4;
  2. run the step in memory (model answers with tool calls are journaled before the tools run);
  3. append the step's events, then write its checkpoint (the commit point), then the job record;
  4. hand on: enqueue the next step, start delegates, resume a parent, or finish the job.
Every action in 4 is idempotent (derived run ids, derived arq job ids, "skip if that checkpoint exists"),
so an attempt that dies anywhere can simply be run again.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shared.models import (
    FINAL_JOB_STATUSES,
    JOB_STATUS_AFTER,
    Checkpoint,
    DelegatedBy,
    ExpertMessage,
    InteractiveToolCallResult,
    RunError,
    RunInput,
    RunSetting,
    TextPart,
    ThinkingPart,
    ToolResult,
    Usage,
    checkpoint_id,
    derived_id,
    now_ms,
)
from shared.queue import StepTask
from shared.store import JobStore
from worker.llm import GeneratedToolCall, GenerationResult, ModelClient, get_model_client
from worker.loop import AnswerJournal, StepInterrupted, StepRunner
from worker.skill_scope import SkillScope, set_skill_scope
from worker.skills import SkillPool, build_skill_set
from worker.tools.base import ToolContext

log = logging.getLogger("perq.worker")


class StepQueue(Protocol):
    """What a step needs of the queue: one round trip to start (is the job cancelled?), one to hand over."""

    async def is_cancelled(self, job_id: str, epoch: int) -> bool: ...

    async def hand_over(
        self, job_id: str, epoch: int, event_lines: list[str], tasks: list[StepTask], answered: list[str]
    ) -> bool:
        """Publish the step's events, enqueue what follows (unless the job is cancelled, or the task is
        live already), and forget the step's journaled answers, all at once. True: refused as cancelled."""

    async def save_answer(self, key: str, data: bytes) -> None: ...

    async def load_answer(self, key: str) -> bytes | None: ...


class LocalQueue:
    """Steps handed over in-process, without Redis: the loop driven directly (benchmarks, tests)."""

    def __init__(self) -> None:
        self.pending: deque[StepTask] = deque()
        self.answers: dict[str, bytes] = {}
        self.cancelled: dict[str, int] = {}  # job id -> when it was cancelled (ms)

    async def is_cancelled(self, job_id: str, epoch: int) -> bool:
        return self.cancelled.get(job_id, -1) >= epoch

    async def hand_over(
        self, job_id: str, epoch: int, event_lines: list[str], tasks: list[StepTask], answered: list[str]
    ) -> bool:
        cancelled = await self.is_cancelled(job_id, epoch)
        if not cancelled:
            self.pending.extend(tasks)
        for key in answered:
            self.answers.pop(key, None)
        return cancelled and bool(tasks)

    async def save_answer(self, key: str, data: bytes) -> None:
        self.answers[key] = data

    async def load_answer(self, key: str) -> bytes | None:
        return self.answers.get(key)


class Unknown(enum.Enum):
    """Nothing was read ahead: the step asks the queue itself."""

    TOKEN = 0


UNKNOWN = Unknown.TOKEN


def answer_key(run_id: str, step_number: int, n: int) -> str:
    return f"perq:answer:{run_id}:{step_number}:{n}"


class QueueAnswerJournal(AnswerJournal):
    """Answers journaled beside the queue: as durable as the step's arq job, and no file per answer."""

    def __init__(self, queue: StepQueue, run_id: str, step_number: int, first_attempt: bool) -> None:
        self.queue, self.run_id, self.step_number = queue, run_id, step_number
        self.first_attempt = first_attempt
        self.keys: list[str] = []

    async def load(self, n: int) -> GenerationResult | None:
        if self.first_attempt:  # nothing can have been recorded before the first attempt
            return None
        try:
            data = await self.queue.load_answer(answer_key(self.run_id, self.step_number, n))
        except Exception as e:
            raise StepInterrupted(f"cannot read the journal: {e}") from e
        if data is None:
            return None
        raw = json.loads(data)
        self.keys.append(answer_key(self.run_id, self.step_number, n))
        return GenerationResult(
            text=raw.get("text"),
            thinking=[ThinkingPart.model_validate(t) for t in raw.get("thinking", [])],
            tool_calls=[GeneratedToolCall(**c) for c in raw["toolCalls"]],
            finish_reason=raw["finishReason"],
            usage=Usage.model_validate(raw["usage"]),
        )

    async def save(self, n: int, result: GenerationResult) -> None:
        raw = {
            "text": result.text,
            "thinking": [t.to_dict() for t in result.thinking],
            "toolCalls": [{"id": c.id, "tool_name": c.tool_name, "args": c.args} for c in result.tool_calls],
            "finishReason": result.finish_reason,
            "usage": result.usage.to_dict(),
        }
        key = answer_key(self.run_id, self.step_number, n)
        try:
            await self.queue.save_answer(key, json.dumps(raw).encode())
        except Exception as e:  # without the record, the tools must not run: the step runs again later
            raise StepInterrupted(f"cannot journal the answer: {e}") from e
        self.keys.append(key)


def last_text(checkpoint: Checkpoint) -> str:
    """What a finished delegate returns: the first text of its last expert message, or "" (spec §3.4)."""
    for message in reversed(checkpoint.messages):
        if isinstance(message, ExpertMessage):
            return message.text
    return ""


def delegate_result_text(end: Checkpoint) -> str:
    if end.status == "completed":
        return last_text(end)
    message = end.error.message if end.error else end.status
    return f"Delegation failed: {message}"


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
    _recorded_at: dict[str, float] = field(default_factory=dict)
    _models: dict[tuple[str, str], ModelClient] = field(default_factory=dict)
    # cancel marks read with each step at pick-up, by arq id, until the step starts
    cancel_marks: dict[str, int | None] = field(default_factory=dict)

    # --- caches -------------------------------------------------------------------------------------

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
        """Keep a checkpoint this worker wrote: its run's next step most often runs here too."""
        self._checkpoints[checkpoint.id] = checkpoint
        if len(self._checkpoints) > 1024:
            self._checkpoints.popitem(last=False)

    def checkpoint(self, job_id: str, checkpoint_id: str) -> Checkpoint | None:
        # a checkpoint id names one immutable state, so a kept copy is as good as the file
        return self._checkpoints.get(checkpoint_id) or self.store.load_checkpoint(job_id, checkpoint_id)

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
        store = self.store
        setting = self.run_setting(task.job_id, task.run_id)
        done = store.load_checkpoint(task.job_id, checkpoint_id(task.run_id, task.step_number))
        if done is not None:
            log.info("step %s of run %s already done; handing on", task.step_number, task.run_id)
            tasks = self.hand_on(setting, done, record=False)
            # the attempt that finished the step may have died before the job record: catch it up, unless
            # what follows the step has run already (then the record is past this step, or moved on)
            if tasks or (done.delegated_by is None and done.status != "proceeding"):
                self._record(setting, done, catch_up=True)
            if await self.queue.hand_over(task.job_id, setting.epoch, [], tasks, []):
                self._settle_cancel(setting)
            return done
        if cancel_mark is UNKNOWN:
            cancelled = await self.queue.is_cancelled(task.job_id, setting.epoch)
        else:
            cancelled = cancel_mark is not None and cancel_mark >= setting.epoch
        if cancelled:
            log.info("job %s is cancelled; step %s not run", task.job_id, task.step_number)
            previous = self.checkpoint(task.job_id, checkpoint_id(task.run_id, task.step_number - 1))
            if previous is not None:  # progress is recorded lazily: the record must show where it stopped
                self._record(setting, previous, catch_up=True)
            self._settle_cancel(setting)
            return None

        start, begins_run = self._starting_point(task)
        if attempt > 1:
            store.drop_events_from_step(task.job_id, task.run_id, task.step_number)
        expert = setting.experts[setting.expert_key]
        tool_context = ToolContext(
            workspace=Path(setting.workspace),
            store_root=store.local_root,
            todos=list(start.todos or []),
            env=self.env,
        )
        journal = QueueAnswerJournal(self.queue, task.run_id, task.step_number, first_attempt=attempt == 1)
        runner = StepRunner(setting=setting, expert=expert, journal=journal)
        # skill servers started or heard from during this step report into its events (worker/skill_scope.py)
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
        lines = [e.to_json() for e in runner.events]
        store.append_event_lines(task.job_id, task.run_id, lines)
        store.save_checkpoint(end)
        self.remember(end)
        await self.queue.hand_over(
            task.job_id, setting.epoch, lines, self.hand_on(setting, end), journal.keys
        )
        return end

    def _starting_point(self, task: StepTask) -> tuple[Checkpoint, bool]:
        """The previous step's checkpoint turned into this step's, or the run's initial checkpoint."""
        previous = self.checkpoint(task.job_id, checkpoint_id(task.run_id, task.step_number - 1))
        if previous is not None:
            start = previous.model_copy(
                update={"id": checkpoint_id(task.run_id, task.step_number), "step_number": task.step_number}
            )
            return start, False
        initial = self.store.load_initial_checkpoint(task.job_id, task.run_id)
        if initial is None or initial.step_number != task.step_number:
            raise LookupError(f"run {task.run_id} has no checkpoint to start step {task.step_number} from")
        return initial, True

    def _settle_cancel(self, setting: RunSetting) -> None:
        """The queue refused this submission's next step: its job was cancelled. The record says so, even
        if a step's write crossed `perq cancel`'s, unless a later submission has taken the job over."""
        job = self.store.load_job(setting.job_id)
        if job is not None and job.epoch == setting.epoch and job.status in ("queued", "running"):
            job.status = "cancelled"
            job.finished_at = job.finished_at or now_ms()
            self.store.save_job(job)

    def fail_job(self, task: StepTask, error: Exception) -> None:
        """A step that keeps failing outside the loop (store damage, a missing file): stop the job, saying
        why, rather than leave it `running` with nothing queued. Best effort: the store may be the cause."""
        try:
            job = self.store.load_job(task.job_id)
            if job is not None and job.status in ("queued", "running"):
                job.status = "stoppedByError"
                job.error = RunError(name=type(error).__name__, message=f"step {task.step_number}: {error}")
                job.finished_at = now_ms()
                self.store.save_job(job)
        except Exception:
            log.exception("could not record the failure of job %s", task.job_id)

    # --- handing on ---------------------------------------------------------------------------------

    def hand_on(self, setting: RunSetting, end: Checkpoint, *, record: bool = True) -> list[StepTask]:
        """Record the step's end and prepare what follows it; return the steps to enqueue."""
        if record:
            self._record(setting, end)
        status = end.status
        if status == "proceeding":
            return self.next_step(end.job_id, end.run_id, end.step_number + 1)
        if status == "stoppedByDelegate":
            return self._start_delegates(setting, end)
        if end.delegated_by is not None and status in ("completed", "stoppedByError"):
            parent = self._parent_of(end)
            # the parent's own delegation decides: a sequential delegate inside a parallel branch still
            # returns to its parent directly, with cumulative usage (spec §3.5, §3.6)
            if len(parent.delegate_to or []) > 1:
                return self._fan_in(setting, end, parent)
            return self._return_to_parent(setting, end, parent)
        return []

    def next_step(self, job_id: str, run_id: str, step_number: int) -> list[StepTask]:
        """A step to enqueue, unless an attempt already finished it (arq itself drops a live duplicate id)."""
        if self.store.checkpoint_exists(job_id, checkpoint_id(run_id, step_number)):
            return []
        return [StepTask(job_id=job_id, run_id=run_id, step_number=step_number)]

    def _record(self, setting: RunSetting, end: Checkpoint, *, catch_up: bool = False) -> None:
        """The job record follows the main chain: totals are assigned from its latest checkpoint (PR #83).

        Runs of a parallel branch hold deltas and never write the totals (spec §9 #22); only max steps,
        which stops the whole job, is recorded from them. A step that only moves a running job on rewrites
        the record at most every `record_interval_s`; every other step writes it. `catch_up` records a
        step found finished again only when the record has not moved past it.
        """
        job = self.store.load_job(end.job_id)
        if job is None:
            raise LookupError(f"job {end.job_id} has no job record")
        if catch_up and (
            (job.status in FINAL_JOB_STATUSES and job.status != "cancelled")
            or job.head_checkpoint_id == end.id
        ):
            return
        if setting.parallel_branch:
            if end.status == "stoppedByExceededMaxSteps" and job.status in ("queued", "running"):
                job.status = "stoppedByMaxSteps"
                job.total_steps = max(job.total_steps, end.step_number)
                job.finished_at = now_ms()
                self.store.save_job(job)
            return
        progress_only = job.status == "running" and end.status == "proceeding" and not catch_up
        now = time.monotonic()
        if progress_only and now - self._recorded_at.get(job.id, 0.0) < self.record_interval_s:
            return
        self._recorded_at[job.id] = now
        if len(self._recorded_at) > 4096:
            self._recorded_at.clear()
        job.total_steps = end.step_number
        job.usage = end.usage
        if end.delegated_by is None and setting.expert_key == job.coordinator_expert_key:
            job.head_checkpoint_id = end.id
        if job.status == "cancelled":  # the step in flight when the job was cancelled still counts
            self.store.save_job(job)
            return
        final = JOB_STATUS_AFTER.get(end.status)
        if end.delegated_by is not None and end.status in ("completed", "stoppedByError"):
            final = None  # a delegate's end goes back to its parent, not to the job
        if final is None:
            job.status = "running"
            job.finished_at = None
            job.error = None
        else:
            job.status = final
            job.error = end.error if final == "stoppedByError" else None
            if final != "stoppedByInteractiveTool":
                job.finished_at = now_ms()
        self.store.save_job(job)

    def _begin_run(self, setting: RunSetting, initial: Checkpoint) -> list[StepTask]:
        """Write a run's setting and initial checkpoint; its first step is to be queued (all idempotent)."""
        if not self.store.checkpoint_exists(initial.job_id, initial.id):
            self.store.save_run_setting(setting)
            self.store.save_initial_checkpoint(initial)
        return self.next_step(initial.job_id, initial.run_id, initial.step_number)

    def _start_delegates(self, setting: RunSetting, end: Checkpoint) -> list[StepTask]:
        targets = end.delegate_to or []
        tasks: list[StepTask] = []
        parallel = len(targets) > 1
        for target in targets:
            run_id = derived_id("delegate", end.id, target.tool_call_id)
            step = end.step_number + 1
            child_setting = setting.model_copy(
                update={
                    "run_id": run_id,
                    "expert_key": target.expert.key,
                    "input": RunInput(text=target.query),
                    "parallel_branch": setting.parallel_branch or parallel,
                    "started_at": now_ms(),
                }
            )
            initial = Checkpoint(
                id=checkpoint_id(run_id, step),
                job_id=end.job_id,
                run_id=run_id,
                status="init",
                step_number=step,
                expert=target.expert,
                usage=Usage() if parallel else end.usage,  # parallel children report deltas (PR #84)
                context_window=end.context_window,
                delegated_by=DelegatedBy(
                    expert=end.expert,
                    tool_call_id=target.tool_call_id,
                    tool_name=target.tool_name,
                    checkpoint_id=end.id,
                    run_id=end.run_id,
                ),
            )
            tasks += self._begin_run(child_setting, initial)
        return tasks

    def _resume_parent(
        self,
        setting: RunSetting,
        parent: Checkpoint,
        run_id: str,
        step_number: int,
        usage: Usage,
        run_input: RunInput,
        parallel_branch: bool,
    ) -> list[StepTask]:
        parent_setting = self.run_setting(parent.job_id, parent.run_id)
        resumed_setting = parent_setting.model_copy(
            update={
                "run_id": run_id,
                "input": run_input,
                "parallel_branch": parallel_branch,
                "started_at": now_ms(),
            }
        )
        initial = parent.model_copy(
            update={
                "id": checkpoint_id(run_id, step_number),
                "run_id": run_id,
                "step_number": step_number,
                "usage": usage,
                "delegate_to": None,
            }
        )
        return self._begin_run(resumed_setting, initial)

    def _parent_of(self, end: Checkpoint) -> Checkpoint:
        assert end.delegated_by is not None
        parent = self.store.load_checkpoint(end.job_id, end.delegated_by.checkpoint_id)
        if parent is None:
            raise LookupError(f"parent checkpoint {end.delegated_by.checkpoint_id} not found")
        return parent

    def _return_to_parent(self, setting: RunSetting, end: Checkpoint, parent: Checkpoint) -> list[StepTask]:
        """A sequential delegate finished (or failed): its parent resumes with the result (spec §3.5)."""
        by = end.delegated_by
        assert by is not None
        answer = InteractiveToolCallResult(
            tool_call_id=by.tool_call_id,
            tool_name=by.tool_name,
            skill_name=f"delegate/{end.expert.key}",
            text=delegate_result_text(end),
        )
        parent_setting = self.run_setting(parent.job_id, parent.run_id)
        return self._resume_parent(
            setting,
            parent,
            derived_id("return", end.run_id),
            end.step_number + 1,
            end.usage,
            RunInput(interactive_tool_call_result=answer),
            parent_setting.parallel_branch,
        )

    def _fan_in(self, setting: RunSetting, end: Checkpoint, parent: Checkpoint) -> list[StepTask]:
        """A parallel delegate finished: leave its result; whoever completes the set resumes the parent.

        Each child writes its own result file before it counts the others, so the last of them to finish
        always sees the whole set; two that finish together both resume, and the derived run id makes that
        one resumption.
        """
        by = end.delegated_by
        assert by is not None
        result = {
            "toolCallId": by.tool_call_id,
            "toolName": by.tool_name,
            "skillName": f"delegate/{end.expert.key}",
            "text": delegate_result_text(end),
            "stepNumber": end.step_number,
            "usage": end.usage.to_dict(),
        }
        self.store.save_fan_in_result(parent.job_id, parent.id, by.tool_call_id, json.dumps(result).encode())
        targets = parent.delegate_to or []
        results = self.store.load_fan_in_results(parent.job_id, parent.id)
        if len(results) < len(targets):
            return []
        by_call = {r["toolCallId"]: r for r in map(json.loads, results)}
        ordered = [by_call[t.tool_call_id] for t in targets]
        usage = parent.usage
        for r in ordered:
            usage = usage + Usage.model_validate(r["usage"])
        first, rest = ordered[0], ordered[1:]
        parent_setting = self.run_setting(parent.job_id, parent.run_id)
        run_input = RunInput(
            interactive_tool_call_result=InteractiveToolCallResult(
                tool_call_id=first["toolCallId"],
                tool_name=first["toolName"],
                skill_name=first["skillName"],
                text=first["text"],
            ),
            extra_tool_results=[
                ToolResult(
                    id=r["toolCallId"],
                    skill_name=r["skillName"],
                    tool_name=r["toolName"],
                    result=[TextPart(text=r["text"])],
                )
                for r in rest
            ]
            or None,
        )
        return self._resume_parent(
            setting,
            parent,
            derived_id("fan-in", parent.id),
            max(r["stepNumber"] for r in ordered) + 1,
            usage,
            run_input,
            parent_setting.parallel_branch,
        )
