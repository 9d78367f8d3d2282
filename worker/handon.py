"""What follows a step: the run's next step, the delegates it started, or its parent's resumption.

Everything here is idempotent, so a step found finished again (a re-run after a crash, or the loser of a
commit race adopting the winner's checkpoint) can compute it again and enqueue the same work: run ids are
derived from what caused them, a run's starting point is written only before its first step exists, and
arq refuses a second live job with the same derived id. It runs synchronously against the store; a worker
on a remote store calls it off its event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from shared.models import (
    Checkpoint,
    DelegatedBy,
    ExpertMessage,
    InteractiveToolCallResult,
    RunInput,
    RunSetting,
    TextPart,
    ToolResult,
    Usage,
    checkpoint_id,
    derived_id,
    now_ms,
)
from shared.queue import StepTask
from shared.store import JobStore


def last_text(checkpoint: Checkpoint) -> str:
    """What a finished delegate returns: the first text of its last expert message, or ""."""
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
class HandOn:
    store: JobStore
    run_setting: Callable[[str, str], RunSetting]  # (job id, run id), cached by the worker
    checkpoint: Callable[[str, str], Checkpoint | None]  # (job id, checkpoint id), cached by the worker

    def follow_ups(self, setting: RunSetting, end: Checkpoint) -> list[StepTask]:
        """Prepare what follows the step that ended with `end`; return the steps to enqueue."""
        unwritten = self.without_writes(end)
        if unwritten is not None:
            return unwritten
        status = end.status
        if status == "stoppedByDelegate":
            return self._start_delegates(setting, end)
        if end.delegated_by is not None and status in ("completed", "stoppedByError"):
            parent = self._parent_of(end)
            # the parent's own delegation decides: a sequential delegate inside a parallel branch still
            # returns to its parent directly, with cumulative usage
            if len(parent.delegate_to or []) > 1:
                return self._fan_in(end, parent)
            return self._return_to_parent(end, parent)
        return []

    def without_writes(self, end: Checkpoint) -> list[StepTask] | None:
        """What follows `end` where preparing it writes nothing (a run's next step, or nothing after a run
        that stopped on its own: a worker works it out on its event loop); None where it writes (delegates
        to start, a parent to resume)."""
        if end.status == "proceeding":
            return self.next_step(end.job_id, end.run_id, end.step_number + 1)
        if end.status == "stoppedByDelegate":
            return None
        if end.delegated_by is not None and end.status in ("completed", "stoppedByError"):
            return None
        return []

    def next_step(self, job_id: str, run_id: str, step_number: int) -> list[StepTask]:
        """A step to enqueue, unless an attempt already finished it (arq itself drops a live duplicate id)."""
        if self.store.checkpoint_exists(job_id, checkpoint_id(run_id, step_number)):
            return []
        return [StepTask(job_id=job_id, run_id=run_id, step_number=step_number)]

    def _begin_run(self, setting: RunSetting, initial: Checkpoint) -> list[StepTask]:
        """Write a run's setting and starting point; its first step is to be queued (all idempotent)."""
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
                usage=Usage() if parallel else end.usage,  # parallel children report deltas
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
        self, parent: Checkpoint, run_id: str, step_number: int, usage: Usage, run_input: RunInput
    ) -> list[StepTask]:
        parent_setting = self.run_setting(parent.job_id, parent.run_id)
        resumed_setting = parent_setting.model_copy(
            update={"run_id": run_id, "input": run_input, "started_at": now_ms()}
        )
        # the parent's conversation carries over by reference (its messages ref), never copied
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
        parent = self.checkpoint(end.job_id, end.delegated_by.checkpoint_id)
        if parent is None:
            raise LookupError(f"parent checkpoint {end.delegated_by.checkpoint_id} not found")
        return parent

    def _return_to_parent(self, end: Checkpoint, parent: Checkpoint) -> list[StepTask]:
        """A sequential delegate finished (or failed): its parent resumes with the result."""
        by = end.delegated_by
        assert by is not None
        answer = InteractiveToolCallResult(
            tool_call_id=by.tool_call_id,
            tool_name=by.tool_name,
            skill_name=f"delegate/{end.expert.key}",
            text=delegate_result_text(end),
        )
        return self._resume_parent(
            parent,
            derived_id("return", end.run_id),
            end.step_number + 1,
            end.usage,
            RunInput(interactive_tool_call_result=answer),
        )

    def _fan_in(self, end: Checkpoint, parent: Checkpoint) -> list[StepTask]:
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
            parent,
            derived_id("fan-in", parent.id),
            max(r["stepNumber"] for r in ordered) + 1,
            usage,
            run_input,
        )
