"""The events of a run: one model per payload of Perstack's event types (a model whose payload several types
share names them all in its `type`), discriminated by `type`, and the tolerant reader for events written by
someone else."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal, Self, cast, get_args

from pydantic import ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from shared.models.core import PerqModel, Usage, new_id, now_ms
from shared.models.messages import ExpertMessage, Message, ToolCall, ToolResult
from shared.models.records import Checkpoint, RunError, RunLimits

# --- steps and events ---------------------------------------------------------------------------------------


class Step(PerqModel):
    step_number: int
    input_messages: list[Message] | None = None
    new_messages: list[Message] = Field(default_factory=list)
    tool_calls: list[ToolCall] | None = None
    tool_results: list[ToolResult] | None = None
    pending_tool_calls: list[ToolCall] | None = None
    partial_tool_results: list[ToolResult] | None = None
    usage: Usage = Field(default_factory=Usage)
    started_at: int = Field(default_factory=now_ms)
    finished_at: int | None = None


# the events that end a step: each carries the step's checkpoint
StepEndingEventType = Literal[
    "continueToNextStep",
    "stopRunByInteractiveTool",
    "stopRunByDelegate",
    "stopRunByExceededMaxSteps",
    "stopRunByError",
    "completeRun",
]
# a generation's fire-and-forget deltas: its reasoning, then its final answer, each in the order they come
ReasoningStreamEventType = Literal["startStreamingReasoning", "streamReasoning", "completeStreamingReasoning"]
RunResultStreamEventType = Literal["startStreamingRunResult", "streamRunResult", "completeStreamingRunResult"]
StreamingEventType = Literal[ReasoningStreamEventType, RunResultStreamEventType]

EventType = Literal[
    # expert state events
    "startRun",
    "startGeneration",
    "retry",
    "callTools",
    "callInteractiveTool",
    "callDelegate",
    "resolveToolResults",
    "attemptCompletion",
    "finishToolCall",
    "resumeToolCalls",
    "finishAllToolCalls",
    StepEndingEventType,
    # streaming events
    StreamingEventType,
    # runtime events
    "initializeRuntime",
    "skillStarting",
    "skillConnected",
    "skillStderr",
    "skillDisconnected",
    # perq: job-level events
    "cancelJob",
]

# the groups as sets, to test an event's `type` (a str) against
STEP_ENDING_EVENTS: frozenset[str] = frozenset(get_args(StepEndingEventType))
STREAMING_EVENTS: frozenset[str] = frozenset(get_args(StreamingEventType))


# What an event leaves out of its line, because the store holds it once elsewhere. Perstack repeats the
# whole conversation in every step's events, which makes a long job's events grow with the square of its
# length. Here:
# - a step-ending event names its checkpoint by id (the file is read back in its place when events are read);
# - startRun's initial checkpoint leaves its messages out (the run's message log holds them);
# - a step keeps its calls, usage and times: its messages and tool results are in the log and in the step's
#   earlier events;
# - finishToolCall's tool message is the one made of the resolveToolResults just before it in the same step:
#   its parts keep their ids, and their contents (the same tool results) are filled in when read.
_STORED_EXCLUDE: dict[str, Any] = {
    "checkpoint": set(Checkpoint.model_fields) - {"id"},
    "initial_checkpoint": {"messages"},
    "step": {"input_messages", "new_messages", "tool_results", "partial_tool_results"},
}
_DERIVED_EXCLUDE: dict[str, Any] = {
    "finishToolCall": _STORED_EXCLUDE | {"new_messages": {"__all__": {"contents": {"__all__": {"contents"}}}}}
}


def stored_exclude(type_: str) -> dict[str, Any]:
    """What an event of this type leaves out of its stored line (`exclude` of `model_dump_json`)."""
    return _DERIVED_EXCLUDE.get(type_, _STORED_EXCLUDE)


class Event(PerqModel):
    """What every event has: Perstack's base fields. Each type is a subclass (`CallTools`, `CompleteRun`, …)
    whose `type` is a literal (or several, for types with one payload: `StopRun`, `StreamDelta`, …) and whose
    payload is typed; `AnyEvent` is their union, discriminated by `type`.

    Keys a type does not declare are kept when an event is read (`extra="allow"`): a field a newer perq or
    Perstack added survives `perq log --json` and `perq export`. Writers cannot add them: `emit` refuses a
    payload key its type does not declare (`emit` on a step's hot path, `build` elsewhere).
    `Event.model_validate` reads any event into its own type and refuses one that does not fit; `read_event`
    is the tolerant reader of stores and streams.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    id: str = Field(default_factory=new_id)
    type: str
    timestamp: int = Field(default_factory=now_ms)
    job_id: str
    run_id: str
    expert_key: str | None = None
    step_number: int | None = None

    _line: str | None = PrivateAttr(default=None)
    _read: bool = PrivateAttr(default=False)  # read from a store or stream by `read_event`

    @classmethod
    def emit(
        cls,
        type_: EventType,
        job_id: str,
        run_id: str,
        expert_key: str | None,
        step_number: int | None,
        **payload: Any,
    ) -> Event:
        """An event of the loop, serialized at once: what it says is fixed when it happens, and its JSON
        line (written to the store and to Redis) is made once, straight from the payload's models.

        The payload is not validated (the loop hands over models it built, and a step is hot): only its
        keys are checked against the type's fields, so that a misspelt key fails here and not in a reader."""
        kind = _payload_checked(type_, payload)
        base = {
            "id": new_id(),
            "type": type_,
            "timestamp": now_ms(),
            "job_id": job_id,
            "run_id": run_id,
            "expert_key": expert_key,
            "step_number": step_number,
        }
        event = _construct(kind, base, payload)
        line = event.model_dump_json(by_alias=True, exclude_none=True, exclude=stored_exclude(type_))
        event._private()["_line"] = line
        return event

    @classmethod
    def build(
        cls,
        type_: str,
        job_id: str,
        run_id: str,
        expert_key: str | None,
        step_number: int | None,
        **payload: Any,
    ) -> Event:
        """An event made like `emit`'s, but validated: for emitters off a step's hot path whose payload holds
        plain values (a skill server's info and timings), which become the type's models here."""
        _payload_checked(type_, payload)
        base = {"type": type_, "jobId": job_id, "runId": run_id, "expertKey": expert_key}
        return Event.model_validate(base | {"stepNumber": step_number} | payload)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """On `Event` itself: the event as its own type (a `CallTools`, …); a type perq does not know, or a
        payload that does not fit its type, is a ValidationError. On a subclass: pydantic's."""
        if cls is Event:
            return cast(Self, _ANY_EVENT.validate_python(obj, *args, **kwargs))
        return super().model_validate(obj, *args, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any) -> Self:
        if cls is Event:
            return cast(Self, _ANY_EVENT.validate_json(json_data, *args, **kwargs))
        return super().model_validate_json(json_data, *args, **kwargs)

    def __eq__(self, other: object) -> bool:
        """Events are equal when they say the same: how one was made (its cached line, whether it was read)
        does not count."""
        if not isinstance(other, Event):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.__dict__ == other.__dict__
            and self.__pydantic_extra__ == other.__pydantic_extra__
        )

    def _private(self) -> dict[str, Any]:
        """The event's private attributes (`_line`, `_read`), from the dict pydantic keeps them in: read as
        `self._line`, each costs a failed lookup and pydantic's `__getattr__`, microseconds on a step's hot
        path (a step reads them a dozen times)."""
        return cast(dict[str, Any], self.__pydantic_private__)

    @property
    def was_read(self) -> bool:
        """Read from a store or a stream (`read_event`), not made here."""
        return bool(self._private()["_read"])

    def to_json(self) -> str:
        line = self._private()["_line"]
        if line is not None:
            return cast(str, line)
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        """An event made here, whole; an event read (`read_event`) as it was written: the keys it was read
        with, never a payload field's default (a stored checkpoint's `messages`, keys a foreign event does not
        have), and always the base fields."""
        if not self.was_read:  # made here (emitted or built): the whole event
            return super().to_dict()
        base = self.model_dump(mode="json", by_alias=True, exclude_none=True, include=set(Event.model_fields))
        return base | self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)


class NextCheckpoint(PerqModel):
    """The checkpoint the next step starts from: perq names it by id and step number; Perstack writes it
    whole, and its other keys are kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    id: str
    step_number: int


# --- expert state events: one per state of a step, in the order the states run ------------------------------


class StartRun(Event):
    type: Literal["startRun"] = "startRun"
    initial_checkpoint: Checkpoint  # as stored, without its messages (the run's message log has them)
    input_messages: list[Message] = Field(default_factory=list)


class StartGeneration(Event):
    type: Literal["startGeneration"] = "startGeneration"
    # perq says how long the conversation sent to the model is; Perstack writes the conversation itself
    message_count: int | None = None
    messages: list[Message] | None = None


class Retry(Event):
    type: Literal["retry"] = "retry"
    reason: str = ""
    new_messages: list[Message] = Field(default_factory=list)
    tool_calls: list[ToolCall] | None = None
    tool_results: list[ToolResult] | None = None
    usage: Usage = Field(default_factory=Usage)


class CallTools(Event):
    type: Literal["callTools"] = "callTools"
    new_message: ExpertMessage | None = None  # left out of the live stream
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)


class CallInteractiveTool(Event):
    type: Literal["callInteractiveTool"] = "callInteractiveTool"
    new_message: ExpertMessage | None = None
    tool_call: ToolCall
    usage: Usage = Field(default_factory=Usage)


class CallDelegate(Event):
    type: Literal["callDelegate"] = "callDelegate"
    new_message: ExpertMessage | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call: ToolCall | None = None  # Perstack's format before the list named one call
    usage: Usage = Field(default_factory=Usage)

    @property
    def calls(self) -> list[ToolCall]:
        """The delegate calls, in either of Perstack's formats."""
        return self.tool_calls or ([self.tool_call] if self.tool_call is not None else [])


class ResolveToolResults(Event):
    type: Literal["resolveToolResults"] = "resolveToolResults"
    tool_results: list[ToolResult] = Field(default_factory=list)


class AttemptCompletion(Event):
    type: Literal["attemptCompletion"] = "attemptCompletion"
    tool_result: ToolResult


class FinishToolCall(Event):
    type: Literal["finishToolCall"] = "finishToolCall"
    new_messages: list[Message] = Field(default_factory=list)


class ResumeToolCalls(Event):
    type: Literal["resumeToolCalls"] = "resumeToolCalls"
    pending_tool_calls: list[ToolCall] = Field(default_factory=list)
    partial_tool_results: list[ToolResult] = Field(default_factory=list)


class FinishAllToolCalls(Event):
    type: Literal["finishAllToolCalls"] = "finishAllToolCalls"
    new_messages: list[Message] = Field(default_factory=list)


class StepEnd(Event):
    """An event that ends a step: it carries the checkpoint the step wrote (read back whole from its file;
    the live stream keeps only what a follower shows of it, its messages never) and the step's record."""

    checkpoint: Checkpoint
    step: Step | None = None  # left out of the live stream


class ContinueToNextStep(StepEnd):
    type: Literal["continueToNextStep"] = "continueToNextStep"
    next_checkpoint: NextCheckpoint | None = None


class StopRun(StepEnd):
    """The run stopped, waiting: for the answer to an interactive tool call (`perq run -i`), for its
    delegates' runs, or for a continuation past its step limit. The three carry the checkpoint alone."""

    type: Literal["stopRunByInteractiveTool", "stopRunByDelegate", "stopRunByExceededMaxSteps"]


class StopRunByError(StepEnd):
    type: Literal["stopRunByError"] = "stopRunByError"
    error: RunError | None = None  # the checkpoint has it too; Perstack's older events lack this copy

    @property
    def run_error(self) -> RunError | None:
        """The run's error, from the event or, where it lacks the copy, from its checkpoint."""
        return self.error or self.checkpoint.error


class CompleteRun(StepEnd):
    type: Literal["completeRun"] = "completeRun"
    text: str = ""
    usage: Usage = Field(default_factory=Usage)  # of the final generation only


# --- streaming events: fire-and-forget deltas of a generation -----------------------------------------------


# Reasoning and the final answer stream alike: a start, deltas, and the whole text at the end.


class StartStreaming(Event):
    type: Literal["startStreamingReasoning", "startStreamingRunResult"]


class StreamDelta(Event):
    type: Literal["streamReasoning", "streamRunResult"]
    delta: str = ""


class CompleteStreaming(Event):
    type: Literal["completeStreamingReasoning", "completeStreamingRunResult"]
    text: str = ""


# --- runtime events: the runtime and its skill servers ------------------------------------------------------
# Perstack's carry no expertKey or stepNumber; perq's skill events have both, so that a re-run step drops
# the skill events of its failed attempt along with the rest.


class AnsweredToolCall(PerqModel):
    tool_name: str
    tool_call_id: str
    text: str


class InitializeRuntime(RunLimits, Event):  # Event's settings (extra keys kept) and fields first
    type: Literal["initializeRuntime"] = "initializeRuntime"
    runtime_version: str = ""
    runtime: str | None = None
    expert_name: str = ""
    experts: list[str] = Field(default_factory=list)
    model: str = ""
    query: str | None = None
    interactive_tool_call: AnsweredToolCall | None = None


class SkillServerInfo(PerqModel):
    name: str | None = None
    version: str | None = None


class SkillStarting(Event):
    type: Literal["skillStarting"] = "skillStarting"
    skill_name: str
    command: str | None = None  # a server perq spawns
    args: list[str] | None = None
    endpoint: str | None = None  # a remote server (perq's)
    transport: str | None = None


class SkillConnected(Event):
    type: Literal["skillConnected"] = "skillConnected"
    skill_name: str
    server_info: SkillServerInfo | None = None
    spawn_duration_ms: int | None = None
    handshake_duration_ms: int | None = None
    connect_duration_ms: int | None = None
    tool_discovery_duration_ms: int | None = None
    total_duration_ms: int | None = None


class SkillStderr(Event):
    type: Literal["skillStderr"] = "skillStderr"
    skill_name: str
    message: str = ""


class SkillDisconnected(Event):
    type: Literal["skillDisconnected"] = "skillDisconnected"
    skill_name: str


class CancelJob(Event):
    """perq's: the job was cancelled (`perq cancel`)."""

    type: Literal["cancelJob"] = "cancelJob"


class UnknownEvent(Event):
    """An event read from a store or stream that perq's types do not cover: a type perq does not know (a
    newer writer's, Perstack's docker events), or a known type whose payload does not fit perq's model of it
    (another version's shape). It keeps every key as it was read, so it is shown and exported whole."""


AnyEvent = Annotated[
    StartRun
    | StartGeneration
    | Retry
    | CallTools
    | CallInteractiveTool
    | CallDelegate
    | ResolveToolResults
    | AttemptCompletion
    | FinishToolCall
    | ResumeToolCalls
    | FinishAllToolCalls
    | ContinueToNextStep
    | StopRun
    | StopRunByError
    | CompleteRun
    | StartStreaming
    | StreamDelta
    | CompleteStreaming
    | InitializeRuntime
    | SkillStarting
    | SkillConnected
    | SkillStderr
    | SkillDisconnected
    | CancelJob,
    Field(discriminator="type"),
]
_ANY_EVENT: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

# every event type's class (a class whose `type` names several serves each), and the payload keys `emit`
# accepts for it (by alias or by name)
EVENT_CLASSES: dict[str, type[Event]] = {
    type_: cls
    for cls in get_args(get_args(AnyEvent)[0])
    for type_ in get_args(cls.model_fields["type"].annotation)
}
_PAYLOAD_KEYS: dict[str, frozenset[str]] = {
    type_: frozenset(
        key
        for name, info in cls.model_fields.items()
        if name not in Event.model_fields
        for key in (name, info.alias or name)
    )
    for type_, cls in EVENT_CLASSES.items()
}


# what `_construct` needs of each event class: every key a field is given by (its name, its alias) with the
# field's name; each field in order: its name, whether it is required, its default value or factory; and
# the private attributes' defaults
_Field = tuple[str, bool, Any, Callable[[], Any] | None]
_Shape = tuple[dict[str, str], list[_Field], dict[str, Any]]
_SHAPES: dict[type[Event], _Shape] = {}
_IMMUTABLE = (type(None), bool, int, float, str, bytes, tuple, frozenset)


def _shape(kind: type[Event]) -> _Shape:
    shape = _SHAPES.get(kind)
    if shape is None:
        names: dict[str, str] = {}
        fields: list[_Field] = []
        for name, info in kind.model_fields.items():
            names[name] = names[info.alias or name] = name
            if info.is_required():
                fields.append((name, True, None, None))
            elif info.default_factory is not None or not isinstance(info.default, _IMMUTABLE):
                # a factory, or a default pydantic copies for each model: asked of pydantic each time
                fields.append((name, False, None, partial(info.get_default, call_default_factory=True)))
            else:
                fields.append((name, False, info.default, None))
        private = {name: attr.get_default() for name, attr in kind.__private_attributes__.items()}
        if not all(isinstance(value, _IMMUTABLE) for value in private.values()):
            raise TypeError(f"{kind.__name__}: a private attribute's default would be shared by every event")
        shape = _SHAPES[kind] = (names, fields, private)
    return shape


def _construct(kind: type[Event], base: dict[str, Any], payload: dict[str, Any]) -> Event:
    """`kind.model_construct(**base, **payload)` (trusted values, no validation; `base` by field names, the
    payload by names or aliases, known to be the type's: `_payload_checked`), as pydantic makes it: the
    fields in their order, those not given at their defaults, the given ones as the fields set, no extras,
    the private attributes at theirs. Why: `model_construct` looks at every field's aliases and validation
    aliases and calls pydantic's hooks, a third of making an event, which a step does several times."""
    names, fields, private = _shape(kind)
    given = base | {names[key]: value for key, value in payload.items()}
    values: dict[str, Any] = {}
    for name, required, default, factory in fields:
        if name in given:
            values[name] = given[name]
        elif required:
            continue
        else:
            values[name] = default if factory is None else factory()
    event = kind.__new__(kind)
    object.__setattr__(event, "__dict__", values)
    object.__setattr__(event, "__pydantic_fields_set__", set(given))
    object.__setattr__(event, "__pydantic_extra__", {})
    object.__setattr__(event, "__pydantic_private__", dict(private))
    return event


def _payload_checked(type_: str, payload: dict[str, Any]) -> type[Event]:
    """The class of an event type, once the payload given to make one is known to have only its fields."""
    kind = EVENT_CLASSES[type_]
    unknown = payload.keys() - _PAYLOAD_KEYS[type_]
    if unknown:
        raise TypeError(f"{type_} events have no field {', '.join(sorted(unknown))}")
    return kind


def read_event(data: str | bytes | dict[str, Any]) -> Event:
    """An event as a store or a stream holds it, read tolerantly: as its own type when it fits, else as an
    `UnknownEvent` holding it as it is. A ValidationError only when it is not an event at all (not JSON, or
    without the base fields)."""
    event: Event
    try:
        event = _ANY_EVENT.validate_python(data) if isinstance(data, dict) else _ANY_EVENT.validate_json(data)
    except ValidationError:
        if isinstance(data, dict):
            event = UnknownEvent.model_validate(data)
        else:
            event = UnknownEvent.model_validate_json(data)
    event._private()["_read"] = True
    return event


def misfit(event: Event) -> bool:
    """Whether a read event is of a type perq knows but did not fit its model (see `UnknownEvent`)."""
    return isinstance(event, UnknownEvent) and event.type in EVENT_CLASSES
