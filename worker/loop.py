"""One step of the expert loop: Perstack's state machine (spec §2), from a step's start to its end.

A step starts from the checkpoint that ended the previous one (or a run's initial checkpoint) and ends at
exactly one step-ending event, whose checkpoint the caller persists. The states are methods; each emits
Perstack's events in Perstack's order, so the event log reads the same as Perstack's. Checkpoints are
copied shallowly: the loop never changes a list or model inside one, it only assigns a copy's fields.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from shared.models import (
    BASE_SKILL_NAME,
    Checkpoint,
    DelegationTarget,
    Event,
    EventType,
    Expert,
    ExpertMessage,
    Message,
    RunError,
    RunSetting,
    Step,
    TextPart,
    ToolCall,
    ToolCallPart,
    ToolResult,
    Usage,
    UserMessage,
    checkpoint_id,
    now_ms,
    tool_message,
)
from worker.instruction import build_instruction
from worker.models.contract import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    ModelClient,
    retry_delay,
)
from worker.skills.toolset import SkillSet, error_result, text_result

KIND_ORDER = {"mcp": 0, "delegate": 1, "interactive": 2}


def retry_note(reason: str) -> UserMessage:
    return UserMessage(contents=[TextPart(text=reason)], retry=True)


class StepInterrupted(Exception):
    """The step cannot go on here (the queue is unreachable): it must run again, not fail its run."""


class AnswerJournal:
    """Where model answers are recorded before their tool calls run, so a re-run step does not pay twice.

    This one records nothing (the loop run in-process, in tests and benchmarks)."""

    async def load(self, n: int) -> GenerationResult | None:
        return None

    async def save(self, n: int, result: GenerationResult) -> None:
        return None


@dataclass
class StepRunner:
    setting: RunSetting
    expert: Expert
    model: ModelClient | None = None
    skills: SkillSet = field(default_factory=SkillSet.empty)
    journal: AnswerJournal = field(default_factory=AnswerJournal)
    events: list[Event] = field(default_factory=list)

    cp: Checkpoint = field(init=False)
    step: Step = field(init=False)
    generations: int = field(init=False, default=0)
    # a new query given with the answers of a paused step: it follows their tool message
    followup: UserMessage | None = field(init=False, default=None)

    # --- events -------------------------------------------------------------------------------------

    def _event(self, type_: EventType, **payload: Any) -> None:
        cp = self.cp
        event = Event.emit(type_, cp.job_id, cp.run_id, self.expert.key, cp.step_number, **payload)
        self.events.append(event)

    def _finish(self, type_: EventType, checkpoint: Checkpoint, **payload: Any) -> Checkpoint:
        checkpoint.todos = list(self.skills.tool_context.todos) or None  # the todo tools' list, as it ends
        self.step.finished_at = now_ms()
        self._event(type_, checkpoint=checkpoint, step=self.step, **payload)
        return checkpoint

    # --- entry --------------------------------------------------------------------------------------

    async def run(self, start: Checkpoint, *, begins_run: bool) -> Checkpoint:
        """Execute one step from `start` (already carrying this step's id and number); return its end."""
        self.cp = start.model_copy()
        self.step = Step(step_number=self.cp.step_number)
        try:
            if begins_run:
                self._init()
            return await self._preparing_for_step()
        except StepInterrupted:
            raise
        except Exception as e:  # every failure ends the run with a checkpoint (spec §9 #16)
            return self._stop_by_error(RunError(name=type(e).__name__, message=str(e) or repr(e)))

    def fail(self, start: Checkpoint, error: RunError) -> Checkpoint:
        """End the step at once because its set-up (skills, provider) failed before anything ran."""
        self.cp = start.model_copy()
        self.step = Step(step_number=self.cp.step_number)
        return self._stop_by_error(error)

    # --- Init (spec §2.3) ---------------------------------------------------------------------------

    def _init(self) -> None:
        initial = self.cp.model_copy()
        given = self.setting.input
        input_messages: list[Message]
        if self.cp.status == "init":
            if given.text is None:
                raise ValueError("Input message is undefined")
            instruction = build_instruction(
                self.expert, self.setting.experts, self.setting.started_at, self.setting.workspace
            )
            input_messages = [instruction, UserMessage(contents=[TextPart(text=given.text)])]
        elif self.cp.status in ("stoppedByDelegate", "stoppedByInteractiveTool"):
            answer = given.interactive_tool_call_result
            if answer is None:
                raise ValueError("Interactive tool call result is undefined")
            result = text_result(
                ToolCall(id=answer.tool_call_id, skill_name=answer.skill_name, tool_name=answer.tool_name),
                answer.text,
            )
            answered = {answer.tool_call_id} | {r.id for r in given.extra_tool_results or []}
            partial = [*(self.cp.partial_tool_results or []), result, *(given.extra_tool_results or [])]
            pending = [c for c in self.cp.pending_tool_calls or [] if c.id not in answered]
            self.cp.partial_tool_results = partial
            self.cp.pending_tool_calls = pending or None
            input_messages = []
            if given.text is not None:
                self.followup = UserMessage(contents=[TextPart(text=given.text)])
        else:
            if given.text is None:
                raise ValueError("Input message is undefined")
            input_messages = [UserMessage(contents=[TextPart(text=given.text)])]
            # a new user turn starts clean: stale error and retry count do not carry over (spec §9 #25)
            self.cp.error = None
            self.cp.retry_count = 0
        self.cp.delegate_to = None
        self._event("startRun", initialCheckpoint=initial, inputMessages=input_messages)
        self.cp.status = "proceeding"
        self.cp.messages = [*self.cp.messages, *input_messages]
        self.step.input_messages = input_messages

    # --- PreparingForStep ---------------------------------------------------------------------------

    async def _preparing_for_step(self) -> Checkpoint:
        pending = self.cp.pending_tool_calls or []
        partial = self.cp.partial_tool_results or []
        if pending:
            self._event("resumeToolCalls", pendingToolCalls=pending, partialToolResults=partial)
            self.step.tool_results = list(partial)
            self.step.pending_tool_calls = list(pending)
            return await self._calling_tool()
        if partial:
            new_messages: list[Message] = [tool_message(partial)]
            if self.followup is not None:
                new_messages.append(self.followup)
            self._event("finishAllToolCalls", newMessages=new_messages)
            self.cp.messages = [*self.cp.messages, *new_messages]
            self.cp.pending_tool_calls = None
            self.cp.partial_tool_results = None
            self.step.tool_results = list(partial)
            self.step.new_messages.extend(new_messages)
            return self._finishing_step()
        # Perstack's startGeneration carries the whole conversation; perq's says how long it is (the
        # conversation itself is the previous checkpoint's, in the run's message log)
        self._event("startGeneration", messageCount=len(self.cp.messages))
        return await self._generating_tool_call()

    # --- generation ---------------------------------------------------------------------------------

    async def _generate(self, with_tools: bool, extra: list[Message] | None = None) -> GenerationResult:
        # skills started lazily: their tools are offered, and a recorded answer's calls are routed to them
        await self.skills.ready()
        n = self.generations
        self.generations += 1
        recorded = await self.journal.load(n)
        if recorded is not None:
            return recorded
        assert self.model is not None, "a step that generates needs a model"
        request = GenerationRequest(
            expert_key=self.expert.key,
            messages=[*self.cp.messages, *(extra or [])],
            tools=self.skills.tools if with_tools else [],
            reasoning_budget=self.setting.reasoning_budget,
            timeout_ms=self.setting.timeout,
            max_retries=self.setting.max_retries,
        )
        try:
            result = await asyncio.wait_for(self.model.generate(request), self.setting.timeout / 1000)
        except TimeoutError as e:
            error = GenerationError(
                f"generation timeout after {self.setting.timeout} ms", name="TimeoutError", is_retryable=True
            )
            await self._back_off(error)
            raise error from e
        except GenerationError as e:
            await self._back_off(e)
            raise
        if result.tool_calls:
            await self.journal.save(n, result)
        return result

    async def _back_off(self, error: GenerationError) -> None:
        """Wait before the generation that retries this one: the provider's retry-after, else exponentially.

        The wait is spent before the retry is recorded, so the next step starts at once on whichever worker
        takes it; nothing waits when the run stops instead."""
        if error.is_retryable and not self._retries_exhausted():
            await asyncio.sleep(retry_delay(error, self.cp.retry_count or 0))

    def _retries_exhausted(self) -> bool:
        return (self.cp.retry_count or 0) >= self.setting.max_retries

    def _retry(self, reason: str, new_messages: list[Message], usage: Usage) -> Checkpoint:
        self._event("retry", reason=reason, newMessages=new_messages, usage=usage)
        self.cp.messages = [*self.cp.messages, *new_messages]
        self.cp.usage = self.cp.usage + usage
        self.cp.retry_count = (self.cp.retry_count or 0) + 1
        self.step.new_messages.extend(new_messages)
        self.step.usage = self.step.usage + usage
        return self._finishing_step()

    def _generation_failed(self, e: GenerationError, new_messages: list[Message]) -> Checkpoint:
        if not e.is_retryable or self._retries_exhausted():
            message = e.message
            if e.is_retryable:
                message = f"Max retries ({self.setting.max_retries}) exceeded: {message}"
            return self._stop_by_error(RunError(name=e.name, message=message, status_code=e.status_code))
        reason = json.dumps({"error": e.name, "message": e.message})
        return self._retry(reason, [*new_messages, retry_note(reason)], Usage())

    def _expert_message(
        self, result: GenerationResult, *, with_calls: list[ToolCall] | None = None, always_text: bool = False
    ) -> ExpertMessage:
        contents: list[Any] = list(result.thinking)
        if result.text or always_text:
            contents.append(TextPart(text=result.text or ""))
        for call in with_calls or []:
            contents.append(ToolCallPart(tool_call_id=call.id, tool_name=call.tool_name, args=call.args))
        return ExpertMessage(contents=contents)

    def _add_usage(self, usage: Usage) -> None:
        self.cp.usage = self.cp.usage + usage
        self.step.usage = self.step.usage + usage

    async def _generating_tool_call(self) -> Checkpoint:
        try:
            result = await self._generate(with_tools=True)
        except GenerationError as e:
            return self._generation_failed(e, [])

        if not result.tool_calls:
            if result.text and result.text.strip():  # implicit completion
                message = self._expert_message(result)
                self._add_usage(result.usage)
                return self._complete(result.text, [message], result.usage)
            reason = "No tool call or text generated. Call a tool or answer with text. Try again."
            if self._retries_exhausted():
                return self._stop_by_error(RunError(name="MaxRetriesExceeded", message=reason))
            return self._retry(reason, [retry_note(reason)], result.usage)

        calls = [
            ToolCall(id=c.id, skill_name=self._skill_of(c.tool_name), tool_name=c.tool_name, args=c.args)
            for c in result.tool_calls
        ]
        calls.sort(key=lambda c: KIND_ORDER[self._kind_of(c.tool_name)])
        if result.finish_reason == "length":
            first = calls[0]
            reason = "Generation length exceeded"
            if self._retries_exhausted():
                return self._stop_by_error(RunError(name="MaxRetriesExceeded", message=reason))
            synthetic = self._expert_message(GenerationResult(), with_calls=[first])
            answer = tool_message([text_result(first, reason)])
            return self._retry(reason, [synthetic, answer], result.usage)
        if result.finish_reason not in ("tool-calls", "stop"):
            return self._stop_by_error(
                RunError(
                    name="UnexpectedFinishReason", message=f"unexpected finish reason {result.finish_reason}"
                )
            )
        message = self._expert_message(result, with_calls=calls)
        self._add_usage(result.usage)
        self.cp.messages = [*self.cp.messages, message]
        self.cp.retry_count = 0
        self.step.new_messages.append(message)
        self.step.tool_calls = calls
        self._event("callTools", newMessage=message, toolCalls=calls, usage=result.usage)
        return await self._calling_tool()

    def _skill_of(self, tool_name: str) -> str:
        tool = self.skills.classify(tool_name)
        return tool.skill_name if tool else "unknown"

    def _kind_of(self, tool_name: str) -> str:
        tool = self.skills.classify(tool_name)
        return tool.kind if tool else "mcp"  # an unknown tool is answered like an MCP call: with an error

    # --- CallingTool --------------------------------------------------------------------------------

    async def _calling_tool(self) -> Checkpoint:
        calls = self.step.pending_tool_calls or self.step.tool_calls or []
        if not calls:
            raise ValueError("No tool calls found")
        completion = next(
            (c for c in calls if c.tool_name == "attemptCompletion" and c.skill_name == BASE_SKILL_NAME), None
        )
        if completion is not None:
            return await self._attempt_completion(completion, [c for c in calls if c is not completion])

        mcp = [c for c in calls if self._kind_of(c.tool_name) == "mcp"]
        delegates = [c for c in calls if self._kind_of(c.tool_name) == "delegate"]
        interactive = [c for c in calls if self._kind_of(c.tool_name) == "interactive"]
        results = [*(self.step.tool_results or []), *(await self.skills.call_all(mcp) if mcp else [])]
        if delegates:
            self.step.partial_tool_results = results
            self.step.pending_tool_calls = delegates + interactive
            self._event(
                "callDelegate", newMessage=self.cp.messages[-1], toolCalls=delegates, usage=self.step.usage
            )
            return self._calling_delegate(delegates, interactive, results)
        if interactive:
            self.step.partial_tool_results = results
            self.step.pending_tool_calls = interactive
            self._event(
                "callInteractiveTool",
                newMessage=self.cp.messages[-1],
                toolCall=interactive[0],
                usage=self.step.usage,
            )
            return self._finish(
                "stopRunByInteractiveTool",
                self._stopped("stoppedByInteractiveTool", pending=interactive, partial=results),
            )
        self.step.tool_results = results
        self.step.pending_tool_calls = None
        self._event("resolveToolResults", toolResults=results)
        return self._resolving_tool_result(results)

    def _skipped(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Perstack leaves calls beside attemptCompletion unanswered (spec §9 #17); perq answers them."""
        message = "not run: attemptCompletion was called in the same response"
        return [error_result(c, "Skipped", message) for c in calls]

    async def _attempt_completion(self, call: ToolCall, others: list[ToolCall]) -> Checkpoint:
        result = await self.skills.call(call)
        results = [result, *self._skipped(others)]
        first_text = next((p.text for p in result.result if isinstance(p, TextPart)), "{}")
        try:
            remaining = json.loads(first_text).get("remainingTodos")
        except (json.JSONDecodeError, AttributeError):
            remaining = None
        if isinstance(remaining, list) and remaining:
            self.step.tool_results = results
            self._event("resolveToolResults", toolResults=results)
            return self._resolving_tool_result(results)
        last = self.cp.messages[-1] if self.cp.messages else None
        if isinstance(last, ExpertMessage) and last.text.strip():
            self.step.tool_results = results
            answer = tool_message(results)
            final = ExpertMessage(contents=[TextPart(text=last.text)])
            return self._complete(last.text, [answer, final], Usage())
        self.step.tool_results = results
        self._event("attemptCompletion", toolResult=result)
        return await self._generating_run_result(results)

    def _resolving_tool_result(self, results: list[ToolResult]) -> Checkpoint:
        message = tool_message(results)
        self._event("finishToolCall", newMessages=[message])
        self.cp.messages = [*self.cp.messages, message]
        self.step.new_messages.append(message)
        return self._finishing_step()

    async def _generating_run_result(self, results: list[ToolResult]) -> Checkpoint:
        answer = tool_message(results)
        try:
            result = await self._generate(with_tools=False, extra=[answer])
        except GenerationError as e:
            return self._generation_failed(e, [answer])
        final = self._expert_message(
            GenerationResult(text=result.text, thinking=result.thinking), always_text=True
        )
        self._add_usage(result.usage)
        return self._complete(result.text or "", [answer, final], result.usage)

    # --- stops --------------------------------------------------------------------------------------

    def _stopped(
        self,
        status: Any,
        *,
        pending: list[ToolCall] | None,
        partial: list[ToolResult] | None,
        delegate_to: list[DelegationTarget] | None = None,
    ) -> Checkpoint:
        cp = self.cp.model_copy()
        cp.status = status
        cp.pending_tool_calls = pending or None
        cp.partial_tool_results = partial
        cp.delegate_to = delegate_to
        return cp

    def _calling_delegate(
        self, delegates: list[ToolCall], interactive: list[ToolCall], results: list[ToolResult]
    ) -> Checkpoint:
        targets: list[DelegationTarget] = []
        by_name = {e.name: e for e in self.setting.experts.values()}
        for call in delegates:
            expert = by_name[call.skill_name]
            query = call.args.get("query")
            targets.append(
                DelegationTarget(
                    expert=expert.ref(),
                    tool_call_id=call.id,
                    tool_name=call.tool_name,
                    query=query if isinstance(query, str) else json.dumps(call.args),
                )
            )
        cp = self._stopped("stoppedByDelegate", pending=interactive, partial=results, delegate_to=targets)
        return self._finish("stopRunByDelegate", cp)

    def _complete(self, text: str, new_messages: list[Message], usage: Usage) -> Checkpoint:
        self.cp.messages = [*self.cp.messages, *new_messages]
        self.step.new_messages.extend(new_messages)
        cp = self.cp.model_copy()
        cp.status = "completed"
        cp.retry_count = 0
        cp.pending_tool_calls = None
        cp.partial_tool_results = None
        return self._finish("completeRun", cp, text=text, usage=usage)

    def _stop_by_error(self, error: RunError) -> Checkpoint:
        cp = self.cp.model_copy()
        cp.status = "stoppedByError"
        cp.error = error
        return self._finish("stopRunByError", cp, error=error)

    # --- FinishingStep ------------------------------------------------------------------------------

    def _finishing_step(self) -> Checkpoint:
        max_steps = self.setting.max_steps
        if max_steps is not None and self.cp.step_number >= max_steps:
            cp = self.cp.model_copy()
            cp.status = "stoppedByExceededMaxSteps"
            return self._finish("stopRunByExceededMaxSteps", cp)
        cp = self.cp.model_copy()
        cp.status = "proceeding"
        following = cp.model_copy(
            update={"id": checkpoint_id(cp.run_id, cp.step_number + 1), "step_number": cp.step_number + 1}
        )
        return self._finish(
            "continueToNextStep", cp, nextCheckpoint={"id": following.id, "stepNumber": following.step_number}
        )
