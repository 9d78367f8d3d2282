"""One step of the expert loop, as Perstack's state machine: explicit states, each returning the next.

A step starts from the checkpoint that ended the previous one (or a run's initial checkpoint) and ends at
exactly one step-ending event, whose checkpoint the caller persists. Each state is a small class whose
`run()` does that state's work and returns the state that follows, so the return types read as the state
diagram:

    Init                 -> PreparingForStep
    PreparingForStep     -> CallingTool | FinishingStep | GeneratingToolCall
    GeneratingToolCall   -> CallingTool | FinishingStep (retry) | Finish (completeRun, stopRunByError)
    CallingTool          -> ResolvingToolResult | GeneratingRunResult | CallingDelegate
                            | CallingInteractiveTool | Finish (completeRun)
    ResolvingToolResult  -> FinishingStep
    GeneratingRunResult  -> FinishingStep (retry) | Finish (completeRun, stopRunByError)
    CallingDelegate      -> Finish (stopRunByDelegate)
    CallingInteractiveTool -> Finish (stopRunByInteractiveTool)
    FinishingStep        -> Finish (continueToNextStep, stopRunByExceededMaxSteps)

`StepRunner.run` drives them until a `Finish`. What the states work on lives in one place, the runner's
`StepState`: the run's checkpoint as this step changes it, and the step's own record. The states emit
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
    NextCheckpoint,
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
    first_text,
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
    """Where model answers are recorded, so that a step run again does not pay twice or take another path.

    A step sends an answer to be recorded as it comes (`begin`) and waits for the record (`recorded`) only
    before something it could not take back: a tool call that may change the world, or the step's commit.
    Read-only tools run meanwhile: a step that dies before its answer is recorded asks the model again,
    whether or not they ran (bench: step handoff, the journal's round trip no longer waited for alone).

    This one records nothing (the loop run in-process, in tests and benchmarks)."""

    async def load(self, n: int) -> GenerationResult | None:
        return None

    async def begin(self, n: int, result: GenerationResult) -> None:
        """Start recording `result`; returns once it is sent, not recorded."""
        return None

    async def recorded(self) -> None:
        """Return once every answer begun is recorded; raises StepInterrupted if one could not be."""
        return None

    def abandon(self) -> None:
        """Stop the records still on their way: the step ended without waiting for them."""
        return None


@dataclass(slots=True)
class StepState:
    """The run as this step holds it: every state reads and changes this, and nothing else.

    `checkpoint` is the run's state, a copy of the step's starting checkpoint whose fields the states
    reassign as the step goes; `step` is the step's own record, carried by the step-ending event."""

    checkpoint: Checkpoint
    step: Step
    # model requests made so far in this step: the journal keys its recorded answers by this count
    generations: int = 0
    # a new query given with the answers of a paused step: it follows their tool message
    followup: UserMessage | None = None


# --- the states ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Finish:
    """The step is over: `checkpoint` is its end, already announced by its step-ending event."""

    checkpoint: Checkpoint


@dataclass(slots=True)
class Init:
    """A run's first step takes its input: a fresh query, the answers to a paused step, or a new turn."""

    async def run(self, ctx: StepRunner) -> PreparingForStep:
        state = ctx.state
        cp = state.checkpoint
        initial = cp.model_copy()
        given = ctx.setting.input
        input_messages: list[Message]
        if cp.status == "init":
            if given.text is None:
                raise ValueError("Input message is undefined")
            instruction = build_instruction(
                ctx.expert, ctx.setting.experts, ctx.setting.started_at, ctx.setting.workspace
            )
            input_messages = [instruction, UserMessage(contents=[TextPart(text=given.text)])]
        elif cp.status in ("stoppedByDelegate", "stoppedByInteractiveTool"):
            answer = given.interactive_tool_call_result
            if answer is None:
                raise ValueError("Interactive tool call result is undefined")
            result = text_result(
                ToolCall(id=answer.tool_call_id, skill_name=answer.skill_name, tool_name=answer.tool_name),
                answer.text,
            )
            answered = {answer.tool_call_id} | {r.id for r in given.extra_tool_results or []}
            partial = [*(cp.partial_tool_results or []), result, *(given.extra_tool_results or [])]
            pending = [c for c in cp.pending_tool_calls or [] if c.id not in answered]
            cp.partial_tool_results = partial
            cp.pending_tool_calls = pending or None
            input_messages = []
            if given.text is not None:
                state.followup = UserMessage(contents=[TextPart(text=given.text)])
        else:
            if given.text is None:
                raise ValueError("Input message is undefined")
            input_messages = [UserMessage(contents=[TextPart(text=given.text)])]
            # a new user turn starts clean: an old error and retry count would otherwise stop it early
            cp.error = None
            cp.retry_count = 0
        # the targets were handed out when the run stopped for them; kept, they would be handed out again
        cp.delegate_to = None
        ctx.emit("startRun", initialCheckpoint=initial, inputMessages=input_messages)
        cp.status = "proceeding"
        cp.messages = [*cp.messages, *input_messages]
        state.step.input_messages = input_messages
        return PreparingForStep()


@dataclass(slots=True)
class PreparingForStep:
    """Pending tool calls run first, answers already in hand are written back, else the model is asked."""

    async def run(self, ctx: StepRunner) -> CallingTool | FinishingStep | GeneratingToolCall:
        state = ctx.state
        cp = state.checkpoint
        pending = cp.pending_tool_calls or []
        partial = cp.partial_tool_results or []
        if pending:
            ctx.emit("resumeToolCalls", pendingToolCalls=pending, partialToolResults=partial)
            state.step.tool_results = list(partial)
            state.step.pending_tool_calls = list(pending)
            return CallingTool()
        if partial:
            new_messages: list[Message] = [tool_message(partial)]
            if state.followup is not None:
                new_messages.append(state.followup)
            ctx.emit("finishAllToolCalls", newMessages=new_messages)
            cp.messages = [*cp.messages, *new_messages]
            cp.pending_tool_calls = None
            cp.partial_tool_results = None
            state.step.tool_results = list(partial)
            state.step.new_messages.extend(new_messages)
            return FinishingStep()
        # Perstack's startGeneration carries the whole conversation; perq's says how long it is (the
        # conversation itself is the previous checkpoint's, in the run's message log)
        ctx.emit("startGeneration", messageCount=len(cp.messages))
        return GeneratingToolCall()


@dataclass(slots=True)
class GeneratingToolCall:
    """The model answers with every tool on offer: tool calls, a final text, or something to retry."""

    async def run(self, ctx: StepRunner) -> CallingTool | FinishingStep | Finish:
        try:
            result = await ctx.generate(with_tools=True)
        except GenerationError as e:
            return ctx.generation_failed(e, [])

        if not result.tool_calls:
            if result.text and result.text.strip():  # implicit completion
                message = ctx.expert_message(result)
                ctx.add_usage(result.usage)
                return ctx.complete(result.text, [message], result.usage)
            reason = "No tool call or text generated. Call a tool or answer with text. Try again."
            if ctx.retries_exhausted():
                return ctx.stop_by_error(RunError(name="MaxRetriesExceeded", message=reason))
            return ctx.retry(reason, [retry_note(reason)], result.usage)

        calls = [
            ToolCall(id=c.id, skill_name=ctx.skill_of(c.tool_name), tool_name=c.tool_name, args=c.args)
            for c in result.tool_calls
        ]
        calls.sort(key=lambda c: KIND_ORDER[ctx.kind_of(c.tool_name)])
        if result.finish_reason == "length":
            first = calls[0]
            reason = "Generation length exceeded"
            if ctx.retries_exhausted():
                return ctx.stop_by_error(RunError(name="MaxRetriesExceeded", message=reason))
            synthetic = ctx.expert_message(GenerationResult(), with_calls=[first])
            answer = tool_message([text_result(first, reason)])
            return ctx.retry(reason, [synthetic, answer], result.usage)
        if result.finish_reason not in ("tool-calls", "stop"):
            return ctx.stop_by_error(
                RunError(
                    name="UnexpectedFinishReason", message=f"unexpected finish reason {result.finish_reason}"
                )
            )
        state = ctx.state
        cp = state.checkpoint
        message = ctx.expert_message(result, with_calls=calls)
        ctx.add_usage(result.usage)
        cp.messages = [*cp.messages, message]
        cp.retry_count = 0
        state.step.new_messages.append(message)
        state.step.tool_calls = calls
        ctx.emit("callTools", newMessage=message, toolCalls=calls, usage=result.usage)
        return CallingTool()


@dataclass(slots=True)
class CallingTool:
    """The step's calls run: MCP calls at once; delegates and interactive tools stop the run for answers."""

    async def run(
        self, ctx: StepRunner
    ) -> ResolvingToolResult | GeneratingRunResult | CallingDelegate | CallingInteractiveTool | Finish:
        state = ctx.state
        step = state.step
        calls = step.pending_tool_calls or step.tool_calls or []
        if not calls:
            raise ValueError("No tool calls found")
        completion = next(
            (c for c in calls if c.tool_name == "attemptCompletion" and c.skill_name == BASE_SKILL_NAME), None
        )
        if completion is not None:
            await ctx.recorded_before([completion])  # served by a base server of the user's own, it waits
            return await self._attempt_completion(ctx, completion, [c for c in calls if c is not completion])

        mcp = [c for c in calls if ctx.kind_of(c.tool_name) == "mcp"]
        delegates = [c for c in calls if ctx.kind_of(c.tool_name) == "delegate"]
        interactive = [c for c in calls if ctx.kind_of(c.tool_name) == "interactive"]
        await ctx.recorded_before(mcp)
        results = [*(step.tool_results or []), *(await ctx.skills.call_all(mcp) if mcp else [])]
        if delegates:
            step.partial_tool_results = results
            step.pending_tool_calls = delegates + interactive
            ctx.emit(
                "callDelegate",
                newMessage=state.checkpoint.messages[-1],
                toolCalls=delegates,
                usage=step.usage,
            )
            return CallingDelegate(delegates, interactive, results)
        if interactive:
            step.partial_tool_results = results
            step.pending_tool_calls = interactive
            ctx.emit(
                "callInteractiveTool",
                newMessage=state.checkpoint.messages[-1],
                toolCall=interactive[0],
                usage=step.usage,
            )
            return CallingInteractiveTool(interactive, results)
        step.tool_results = results
        step.pending_tool_calls = None
        ctx.emit("resolveToolResults", toolResults=results)
        return ResolvingToolResult(results)

    async def _attempt_completion(
        self, ctx: StepRunner, call: ToolCall, others: list[ToolCall]
    ) -> ResolvingToolResult | GeneratingRunResult | Finish:
        """attemptCompletion runs alone: open todos send the model back to work; else the run completes
        with the text beside the call, or with a final answer asked for without tools."""
        state = ctx.state
        result = await ctx.skills.call(call)
        results = [result, *skipped(others)]
        try:
            remaining = json.loads(first_text(result.result, "{}")).get("remainingTodos")
        except (json.JSONDecodeError, AttributeError):
            remaining = None
        if isinstance(remaining, list) and remaining:
            state.step.tool_results = results
            ctx.emit("resolveToolResults", toolResults=results)
            return ResolvingToolResult(results)
        messages = state.checkpoint.messages
        last = messages[-1] if messages else None
        if isinstance(last, ExpertMessage) and last.text.strip():
            state.step.tool_results = results
            answer = tool_message(results)
            final = ExpertMessage(contents=[TextPart(text=last.text)])
            return ctx.complete(last.text, [answer, final], Usage())
        state.step.tool_results = results
        ctx.emit("attemptCompletion", toolResult=result)
        return GeneratingRunResult(results)


def skipped(calls: list[ToolCall]) -> list[ToolResult]:
    """Calls made beside attemptCompletion are answered as not run: a call left without a result makes
    providers refuse the conversation if it ever goes on."""
    message = "not run: attemptCompletion was called in the same response"
    return [error_result(c, "Skipped", message) for c in calls]


@dataclass(slots=True)
class ResolvingToolResult:
    """The calls' results join the conversation as one tool message."""

    results: list[ToolResult]

    async def run(self, ctx: StepRunner) -> FinishingStep:
        state = ctx.state
        cp = state.checkpoint
        message = tool_message(self.results)
        ctx.emit("finishToolCall", newMessages=[message])
        cp.messages = [*cp.messages, message]
        state.step.new_messages.append(message)
        return FinishingStep()


@dataclass(slots=True)
class GeneratingRunResult:
    """attemptCompletion came without text: the model is asked, without tools, for the run's result."""

    results: list[ToolResult]

    async def run(self, ctx: StepRunner) -> FinishingStep | Finish:
        answer = tool_message(self.results)
        try:
            result = await ctx.generate(with_tools=False, extra=[answer])
        except GenerationError as e:
            return ctx.generation_failed(e, [answer])
        # always a text part, even empty: a delegate's result is read from it
        final = ctx.expert_message(
            GenerationResult(text=result.text, thinking=result.thinking), always_text=True
        )
        ctx.add_usage(result.usage)
        return ctx.complete(result.text or "", [answer, final], result.usage)


@dataclass(slots=True)
class CallingDelegate:
    """The run stops for its delegates; each call becomes a target with the query it was given."""

    delegates: list[ToolCall]
    interactive: list[ToolCall]
    results: list[ToolResult]

    async def run(self, ctx: StepRunner) -> Finish:
        targets: list[DelegationTarget] = []
        by_name = {e.name: e for e in ctx.setting.experts.values()}
        for call in self.delegates:
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
        cp = ctx.stopped(
            "stoppedByDelegate", pending=self.interactive, partial=self.results, delegate_to=targets
        )
        return ctx.finish("stopRunByDelegate", cp)


@dataclass(slots=True)
class CallingInteractiveTool:
    """The run stops until the user answers its interactive calls (the first is the one asked)."""

    interactive: list[ToolCall]
    results: list[ToolResult]

    async def run(self, ctx: StepRunner) -> Finish:
        cp = ctx.stopped("stoppedByInteractiveTool", pending=self.interactive, partial=self.results)
        return ctx.finish("stopRunByInteractiveTool", cp)


@dataclass(slots=True)
class FinishingStep:
    """The step ends: the run goes on to the next step, unless it has used up its steps."""

    async def run(self, ctx: StepRunner) -> Finish:
        cp = ctx.state.checkpoint
        max_steps = ctx.setting.max_steps
        # checked only here, at a step's end, and with >=: the step numbered max_steps is the last one
        if max_steps is not None and cp.step_number >= max_steps:
            end = cp.model_copy()
            end.status = "stoppedByExceededMaxSteps"
            return ctx.finish("stopRunByExceededMaxSteps", end)
        end = cp.model_copy()
        end.status = "proceeding"
        # the next step's checkpoint, named by id and number
        following = NextCheckpoint(
            id=checkpoint_id(end.run_id, end.step_number + 1), step_number=end.step_number + 1
        )
        return ctx.finish("continueToNextStep", end, nextCheckpoint=following)


# every state a step can be in; `Finish` ends it
Node = (
    Init
    | PreparingForStep
    | GeneratingToolCall
    | CallingTool
    | ResolvingToolResult
    | GeneratingRunResult
    | CallingDelegate
    | CallingInteractiveTool
    | FinishingStep
    | Finish
)


# --- the driver, and what the states share -----------------------------------------------------------------


@dataclass
class StepRunner:
    """Runs one step: the states above, driven from the step's start to its `Finish`.

    It holds what the states need besides the run's state: the run's setting, the expert, the model, the
    skills, the answer journal, and the step's events as they are emitted."""

    setting: RunSetting
    expert: Expert
    model: ModelClient | None = None
    skills: SkillSet = field(default_factory=SkillSet.empty)
    journal: AnswerJournal = field(default_factory=AnswerJournal)
    events: list[Event] = field(default_factory=list)

    state: StepState = field(init=False)

    # --- entry --------------------------------------------------------------------------------------

    async def run(self, start: Checkpoint, *, begins_run: bool) -> Checkpoint:
        """Execute one step from `start` (already carrying this step's id and number); return its end."""
        self.state = StepState(start.model_copy(), Step(step_number=start.step_number))
        node: Node = Init() if begins_run else PreparingForStep()
        try:
            while not isinstance(node, Finish):
                node = await node.run(self)
        except StepInterrupted:
            raise
        except Exception as e:  # any failure ends the run with a checkpoint saying why, never a stuck job
            node = self.stop_by_error(RunError(name=type(e).__name__, message=str(e) or repr(e)))
        return node.checkpoint

    def fail(self, start: Checkpoint, error: RunError) -> Checkpoint:
        """End the step at once because its set-up (skills, provider) failed before anything ran."""
        self.state = StepState(start.model_copy(), Step(step_number=start.step_number))
        return self.stop_by_error(error).checkpoint

    # --- events and step ends -----------------------------------------------------------------------

    def emit(self, type_: EventType, **payload: Any) -> None:
        cp = self.state.checkpoint
        event = Event.emit(type_, cp.job_id, cp.run_id, self.expert.key, cp.step_number, **payload)
        self.events.append(event)

    def finish(self, type_: EventType, checkpoint: Checkpoint, **payload: Any) -> Finish:
        """End the step with `checkpoint`, announced by the step-ending event `type_`."""
        checkpoint.todos = list(self.skills.tool_context.todos) or None  # the todo tools' list, as it ends
        step = self.state.step
        step.finished_at = now_ms()
        self.emit(type_, checkpoint=checkpoint, step=step, **payload)
        return Finish(checkpoint)

    def stopped(
        self,
        status: Any,
        *,
        pending: list[ToolCall] | None,
        partial: list[ToolResult] | None,
        delegate_to: list[DelegationTarget] | None = None,
    ) -> Checkpoint:
        """The run's checkpoint, stopped to wait for answers to `pending`."""
        cp = self.state.checkpoint.model_copy()
        cp.status = status
        cp.pending_tool_calls = pending or None
        cp.partial_tool_results = partial
        cp.delegate_to = delegate_to
        return cp

    def complete(self, text: str, new_messages: list[Message], usage: Usage) -> Finish:
        state = self.state
        state.checkpoint.messages = [*state.checkpoint.messages, *new_messages]
        state.step.new_messages.extend(new_messages)
        cp = state.checkpoint.model_copy()
        cp.status = "completed"
        cp.retry_count = 0
        cp.pending_tool_calls = None
        cp.partial_tool_results = None
        return self.finish("completeRun", cp, text=text, usage=usage)

    def stop_by_error(self, error: RunError) -> Finish:
        cp = self.state.checkpoint.model_copy()
        cp.status = "stoppedByError"
        cp.error = error
        return self.finish("stopRunByError", cp, error=error)

    # --- generation ---------------------------------------------------------------------------------

    async def recorded_before(self, calls: list[ToolCall]) -> None:
        """Wait for the step's answers to be journaled unless every call changes nothing outside the step:
        a call that may change the world runs only on a recorded answer."""
        if not all(self.skills.changes_nothing(c) for c in calls):
            await self.journal.recorded()

    async def generate(self, with_tools: bool, extra: list[Message] | None = None) -> GenerationResult:
        # skills started lazily: their tools are offered, and a recorded answer's calls are routed to them
        await self.skills.ready()
        state = self.state
        n = state.generations
        state.generations += 1
        recorded = await self.journal.load(n)
        if recorded is not None:
            return recorded
        await self.journal.recorded()  # a step whose answer cannot be recorded pays for no other
        assert self.model is not None, "a step that generates needs a model"
        request = GenerationRequest(
            expert_key=self.expert.key,
            messages=[*state.checkpoint.messages, *(extra or [])],
            tools=self.skills.tools if with_tools else [],
            reasoning_budget=self.setting.reasoning_budget,
            timeout_ms=self.setting.timeout,
            max_retries=self.setting.max_retries,
        )
        try:
            # in this task (wait_for would make one per generation)
            async with asyncio.timeout(self.setting.timeout / 1000):
                result = await self.model.generate(request)
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
            await self.journal.begin(n, result)
        return result

    async def _back_off(self, error: GenerationError) -> None:
        """Wait before the generation that retries this one: the provider's retry-after, else exponentially.

        The wait is spent before the retry is recorded, so the next step starts at once on whichever worker
        takes it; nothing waits when the run stops instead."""
        if error.is_retryable and not self.retries_exhausted():
            await asyncio.sleep(retry_delay(error, self.state.checkpoint.retry_count or 0))

    def retries_exhausted(self) -> bool:
        return (self.state.checkpoint.retry_count or 0) >= self.setting.max_retries

    def retry(self, reason: str, new_messages: list[Message], usage: Usage) -> FinishingStep:
        """Record a failed generation; the step ends, and the next one asks again."""
        self.emit("retry", reason=reason, newMessages=new_messages, usage=usage)
        state = self.state
        cp = state.checkpoint
        cp.messages = [*cp.messages, *new_messages]
        cp.usage = cp.usage + usage
        cp.retry_count = (cp.retry_count or 0) + 1
        state.step.new_messages.extend(new_messages)
        state.step.usage = state.step.usage + usage
        return FinishingStep()

    def generation_failed(self, e: GenerationError, new_messages: list[Message]) -> FinishingStep | Finish:
        """A retryable error is retried while retries are left; any other error stops the run at once,
        so a refused key or a bad request is not asked again and again."""
        if not e.is_retryable or self.retries_exhausted():
            message = e.message
            if e.is_retryable:
                message = f"Max retries ({self.setting.max_retries}) exceeded: {message}"
            return self.stop_by_error(RunError(name=e.name, message=message, status_code=e.status_code))
        reason = json.dumps({"error": e.name, "message": e.message})
        return self.retry(reason, [*new_messages, retry_note(reason)], Usage())

    def expert_message(
        self, result: GenerationResult, *, with_calls: list[ToolCall] | None = None, always_text: bool = False
    ) -> ExpertMessage:
        # thinking, then text, then tool calls: the order Anthropic requires of a message with thinking
        contents: list[Any] = list(result.thinking)
        if result.text or always_text:
            contents.append(TextPart(text=result.text or ""))
        for call in with_calls or []:
            contents.append(ToolCallPart(tool_call_id=call.id, tool_name=call.tool_name, args=call.args))
        return ExpertMessage(contents=contents)

    def add_usage(self, usage: Usage) -> None:
        state = self.state
        state.checkpoint.usage = state.checkpoint.usage + usage
        state.step.usage = state.step.usage + usage

    # --- tools --------------------------------------------------------------------------------------

    def skill_of(self, tool_name: str) -> str:
        tool = self.skills.classify(tool_name)
        return tool.skill_name if tool else "unknown"

    def kind_of(self, tool_name: str) -> str:
        tool = self.skills.classify(tool_name)
        return tool.kind if tool else "mcp"  # an unknown tool is answered like an MCP call: with an error
