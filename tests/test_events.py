"""Events as types: every type written and read back as itself, and how reading treats what it does not know.

A store may hold events perq did not write (Perstack's runtime, an older or newer perq): reading keeps them,
as their own type when they fit it, else as an `UnknownEvent` with every key they had.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from shared.events import live_line
from shared.models import (
    EVENT_CLASSES,
    STEP_ENDING_EVENTS,
    CallDelegate,
    CallTools,
    Checkpoint,
    CompleteRun,
    ContinueToNextStep,
    Event,
    ExpertMessage,
    ExpertRef,
    FinishToolCall,
    NextCheckpoint,
    ResolveToolResults,
    RunError,
    SkillConnected,
    StartRun,
    Step,
    StepEnd,
    StopRunByError,
    TextPart,
    ToolCall,
    ToolMessage,
    ToolResult,
    UnknownEvent,
    Usage,
    UserMessage,
    checkpoint_id,
    misfit,
    read_event,
    tool_message,
)
from shared.models.events import _construct, stored_exclude
from shared.store import JobStore

REPO = Path(__file__).resolve().parents[1]
PERSTACK_STORE = REPO.parent / "shared" / "interop" / "perstack-written-store"
OLD_STORE = REPO / "tests" / "data" / "store-before-message-log" / "perstack"
BASE = {"id": "e1", "timestamp": 5, "jobId": "j1", "runId": "r1", "expertKey": "e", "stepNumber": 1}

CHECKPOINT: dict[str, Any] = {
    "id": "cp1",
    "jobId": "j1",
    "runId": "r1",
    "status": "proceeding",
    "stepNumber": 1,
    "expert": {"key": "e", "name": "e", "version": "1.0.0"},
}
CALL = {"id": "c1", "skillName": "s", "toolName": "t", "args": {"a": 1}}
RESULT = {
    "id": "c1",
    "skillName": "s",
    "toolName": "t",
    "result": [{"id": "p", "type": "textPart", "text": "ok"}],
}
USER = {"id": "m", "type": "userMessage", "contents": [{"id": "p", "type": "textPart", "text": "hi"}]}

# the payload each type is written with, as Perstack's and perq's writers give it
PAYLOADS: dict[str, dict[str, Any]] = {
    "startRun": {"initialCheckpoint": CHECKPOINT, "inputMessages": [USER]},
    "startGeneration": {"messageCount": 3},
    "retry": {"reason": "again", "newMessages": [USER], "usage": {"inputTokens": 1}},
    "callTools": {"toolCalls": [CALL], "usage": {"inputTokens": 2}},
    "callInteractiveTool": {"toolCall": CALL},
    "callDelegate": {"toolCalls": [CALL]},
    "resolveToolResults": {"toolResults": [RESULT]},
    "attemptCompletion": {"toolResult": RESULT},
    "finishToolCall": {"newMessages": [USER]},
    "resumeToolCalls": {"pendingToolCalls": [CALL], "partialToolResults": [RESULT]},
    "finishAllToolCalls": {"newMessages": [USER]},
    "continueToNextStep": {
        "checkpoint": CHECKPOINT,
        "step": {"stepNumber": 1},
        "nextCheckpoint": {"id": "cp2"},
    },
    "stopRunByInteractiveTool": {"checkpoint": CHECKPOINT},
    "stopRunByDelegate": {"checkpoint": CHECKPOINT},
    "stopRunByExceededMaxSteps": {"checkpoint": CHECKPOINT},
    "stopRunByError": {
        "checkpoint": CHECKPOINT,
        "error": {"name": "E", "message": "boom", "isRetryable": False},
    },
    "completeRun": {"checkpoint": CHECKPOINT, "text": "done", "usage": {"outputTokens": 3}},
    "startStreamingReasoning": {},
    "streamReasoning": {"delta": "th"},
    "completeStreamingReasoning": {"text": "thought"},
    "startStreamingRunResult": {},
    "streamRunResult": {"delta": "do"},
    "completeStreamingRunResult": {"text": "done"},
    "initializeRuntime": {"runtimeVersion": "1", "expertName": "e", "experts": ["e"], "model": "m"},
    "skillStarting": {"skillName": "s", "command": "npx", "args": ["x"]},
    "skillConnected": {"skillName": "s", "serverInfo": {"name": "s", "version": "1"}, "totalDurationMs": 9},
    "skillStderr": {"skillName": "s", "message": "hello"},
    "skillDisconnected": {"skillName": "s"},
    "cancelJob": {},
}
PAYLOADS["continueToNextStep"]["nextCheckpoint"]["stepNumber"] = 2


def test_every_event_type_has_a_class_and_a_payload_here() -> None:
    assert set(EVENT_CLASSES) == set(PAYLOADS)
    assert {t for t, cls in EVENT_CLASSES.items() if issubclass(cls, StepEnd)} == STEP_ENDING_EVENTS


@pytest.mark.parametrize("type_", sorted(PAYLOADS))
def test_every_type_reads_back_as_itself(type_: str) -> None:
    event = Event.model_validate(BASE | {"type": type_} | PAYLOADS[type_])
    assert type(event) is EVENT_CLASSES[type_] and event.type == type_
    again = read_event(event.to_json())
    assert type(again) is type(event) and again == event
    assert read_event(event.to_dict()) == event


def test_a_type_perq_does_not_know_is_read_whole() -> None:
    line = json.dumps(BASE | {"type": "dockerBuildProgress", "stage": "pull", "progress": {"done": 3}})
    event = read_event(line)
    assert isinstance(event, UnknownEvent) and event.type == "dockerBuildProgress"
    assert event.to_dict() == json.loads(line)  # nothing lost: `perq log --json` and export show it all
    with pytest.raises(ValidationError):  # the strict reader is for what perq writes
        Event.model_validate_json(line)


def test_keys_a_type_does_not_declare_are_kept() -> None:
    data = BASE | {"type": "callTools", "toolCalls": [CALL], "newerField": {"x": 1}}
    event = read_event(json.dumps(data))
    assert isinstance(event, CallTools) and event.tool_calls[0].tool_name == "t"
    assert event.to_dict()["newerField"] == {"x": 1}


def test_a_known_type_that_does_not_fit_is_read_as_it_is() -> None:
    data = BASE | {"type": "callTools", "toolCalls": "not a list"}
    event = read_event(data)
    assert isinstance(event, UnknownEvent) and event.to_dict() == data


def test_what_is_no_event_at_all_is_refused() -> None:
    with pytest.raises(ValidationError):
        read_event(b"garbage")
    with pytest.raises(ValidationError):
        read_event({"type": "callTools"})  # no job, no run


def test_perstacks_older_call_delegate_names_one_call() -> None:
    event = read_event(BASE | {"type": "callDelegate", "toolCall": CALL})
    assert isinstance(event, CallDelegate) and [c.id for c in event.calls] == ["c1"]


def test_emit_refuses_a_key_its_type_does_not_have() -> None:
    with pytest.raises(TypeError, match="toolcalls"):
        Event.emit("callTools", "j1", "r1", "e", 1, toolcalls=[])


@pytest.mark.parametrize("type_", sorted(PAYLOADS))
def test_emit_makes_the_event_model_construct_would(type_: str) -> None:
    """`emit` makes its events without pydantic's `model_construct` (`_construct`, a step's hot path): the
    same model, field by field in the same order, the same fields set, extras and private attributes, the
    same line; with the payload given by aliases, by names, or not at all (every field at its default)."""
    whole = Event.model_validate(BASE | {"type": type_} | PAYLOADS[type_])
    kind = type(whole)
    fields = kind.model_fields
    payload = {n: getattr(whole, n) for n in whole.model_fields_set if n not in Event.model_fields}
    by_alias = {fields[name].alias or name: value for name, value in payload.items()}
    base = {"id": "e1", "type": type_, "timestamp": 5, "job_id": "j1", "run_id": "r1"}
    base |= {"expert_key": "e", "step_number": 1}
    for given in (by_alias, payload, {}):
        made = _construct(kind, base, given)
        expected = kind.model_construct(**base, **given)
        assert type(made) is kind
        assert list(made.__dict__.items()) == list(expected.__dict__.items())
        assert made.model_fields_set == expected.model_fields_set
        assert made.__pydantic_extra__ == expected.__pydantic_extra__
        assert made.__pydantic_private__ == expected.__pydantic_private__
        assert made.to_json() == expected.to_json() and not made.was_read
        for name, value in made.__dict__.items():  # a default made for this event, not shared with another
            if isinstance(value, list | BaseModel) and not (given and name in payload) and name not in base:
                assert value is not _construct(kind, base, given).__dict__[name]
    emitted = Event.emit(type_, "j1", "r1", "e", 1, **by_alias)  # and `emit` writes the line it stores
    assert emitted.to_json() == emitted.model_dump_json(
        by_alias=True, exclude_none=True, exclude=stored_exclude(type_)
    )


def checkpoint(step: int, **update: Any) -> Checkpoint:
    cp = Checkpoint(
        id=checkpoint_id("r1", step),
        job_id="j1",
        run_id="r1",
        status="proceeding",
        step_number=step,
        expert=ExpertRef(key="e", name="e"),
        messages=[UserMessage(contents=[TextPart(text="hi")])],
        usage=Usage(input_tokens=step),
    )
    return cp.model_copy(update=update)


def test_emitted_events_read_back_from_the_store_as_their_types(tmp_path: Path) -> None:
    """What a step leaves out of its lines (the checkpoint, finishToolCall's results) is read back in."""
    store = JobStore.open(str(tmp_path / "perstack"))
    call = ToolCall(id="c1", skill_name="s", tool_name="t")
    results = [ToolResult(id="c1", skill_name="s", tool_name="t", result=[TextPart(text="found")])]
    end = checkpoint(1)
    store.save_checkpoint(end)
    stopped = checkpoint(2, status="stoppedByError", error=RunError(name="E", message="boom"))
    store.save_checkpoint(stopped)

    def emit(type_: Any, number: int, /, **payload: Any) -> Event:
        return Event.emit(type_, "j1", "r1", "e", number, **payload)

    said = ExpertMessage(contents=[TextPart(text="calling")])
    events = [
        emit("startRun", 1, initialCheckpoint=checkpoint(1, status="init"), inputMessages=[]),
        emit("callTools", 1, newMessage=said, toolCalls=[call], usage=Usage(output_tokens=2)),
        emit("resolveToolResults", 1, toolResults=results),
        emit("finishToolCall", 1, newMessages=[tool_message(results)]),
        emit(
            "continueToNextStep",
            1,
            checkpoint=end,
            step=Step(step_number=1),
            nextCheckpoint=NextCheckpoint(id=checkpoint_id("r1", 2), step_number=2),
        ),
        emit("stopRunByError", 2, checkpoint=stopped, step=Step(step_number=2), error=stopped.error),
    ]
    store.append_events("j1", "r1", events)
    read, problems = store.read_events("j1", "r1")
    assert problems == []
    assert [type(e) for e in read] == [type(e) for e in events]
    start, calls, resolved, finished, following, error = read
    assert isinstance(start, StartRun) and start.initial_checkpoint.status == "init"
    assert isinstance(calls, CallTools) and calls.tool_calls == [call] and calls.new_message == said
    assert isinstance(resolved, ResolveToolResults) and resolved.tool_results == results
    assert isinstance(finished, FinishToolCall)
    message = finished.new_messages[0]
    assert isinstance(message, ToolMessage) and message.contents[0].contents == results[0].result
    assert isinstance(following, ContinueToNextStep) and following.checkpoint.usage == Usage(input_tokens=1)
    assert following.next_checkpoint is not None and following.next_checkpoint.step_number == 2
    assert isinstance(error, StopRunByError) and error.checkpoint.status == "stoppedByError"
    assert error.error == RunError(name="E", message="boom")


def test_a_misfit_or_missing_checkpoint_is_named_and_the_event_kept(tmp_path: Path) -> None:
    store = JobStore.open(str(tmp_path / "perstack"))
    end = Event.emit("completeRun", "j1", "r1", "e", 1, checkpoint=checkpoint(1), step=Step(step_number=1))
    newer = read_event(BASE | {"id": "e2", "type": "somethingNew"})
    store.append_events("j1", "r1", [end, newer])  # the checkpoint file was never written
    read, problems = store.read_events("j1", "r1")
    assert [(type(e), e.type) for e in read] == [
        (UnknownEvent, "completeRun"),
        (UnknownEvent, "somethingNew"),
    ]
    assert len(problems) == 2  # the missing checkpoint, and the completeRun that cannot be one without it
    assert "missing" in problems[0] and "completeRun" in problems[1]


def test_the_live_form_reads_as_the_same_types() -> None:
    """What followers get from Redis: no messages, a checkpoint cut to what they show, still typed."""
    cp = checkpoint(3, status="completed")
    end = Event.emit(
        "completeRun", "j1", "r1", "e", 3, checkpoint=cp, step=Step(step_number=3), text="x" * 5000
    )
    live = read_event(live_line(end))
    assert isinstance(live, CompleteRun) and live.step is None
    assert live.checkpoint.status == "completed" and live.checkpoint.usage == cp.usage
    assert live.checkpoint.messages == [] and len(live.text) < 5000
    said = ExpertMessage(contents=[TextPart(text="calling")])
    calls = Event.emit("callTools", "j1", "r1", "e", 3, newMessage=said, toolCalls=[], usage=Usage())
    live_calls = read_event(live_line(calls))
    assert isinstance(live_calls, CallTools) and live_calls.new_message is None


def _live_by_parsing(event: Event) -> dict[str, Any]:
    """What the live form says, made the slow, plain way: the whole line parsed, then cut."""
    data = json.loads(event.to_json())
    if isinstance(event, StepEnd):
        data["checkpoint"] = event.checkpoint.model_dump(
            mode="json",
            by_alias=True,
            exclude_none=True,
            include={"id", "job_id", "run_id", "expert", "status", "step_number", "usage"}
            | {"delegated_by", "error", "pending_tool_calls", "todos"},
        )
    for key in ("newMessage", "newMessages", "messages", "step"):
        data.pop(key, None)

    def cut(value: Any, limit: int = 200) -> Any:
        if isinstance(value, str):
            return value if len(value) <= limit else value[:limit] + "…"
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v) for v in value]
        return value

    text = data.pop("text", None)
    data = cut(data)
    if isinstance(text, str):
        data["text"] = cut(text, 4000)
    return data


@pytest.mark.parametrize(
    "text",
    [
        "short",
        "y" * 200,  # at the limit: kept
        "y" * 201,  # past it: cut
        'q"' * 150,  # escaped quotes: no piece between quotes is long, the string is
        "\\" * 120,  # escaped backslashes: written longer than they are
        '\\"' * 120,  # a backslash and a quote, each escaped
        "w" * 300 + "\\",  # a string that ends in a backslash: its closing quote follows an escape
        '"' + "v" * 300 + '"',  # quoted: the long run lies between escaped quotes
        "é" * 250,
        "z" * 5000,
    ],
)
def test_the_live_form_is_what_parsing_and_cutting_would_make(text: str) -> None:
    """The live form skips the parse where it can (the line as it is, a step's end dumped from its models);
    what it says must be what the whole line parsed and cut says, for events made here and read back."""
    said = ExpertMessage(contents=[TextPart(text=text)])
    call = ToolCall(
        id="t1",
        skill_name="s",
        tool_name="t",
        args={"q": text, "n": 3, "k" * 250: [text], "ns": list(range(100))},
    )
    cp = checkpoint(2, status="completed", messages=[UserMessage(contents=[TextPart(text=text)])])
    failed = cp.model_copy(update={"status": "stoppedByError", "error": RunError(name="E", message=text)})
    asked = [UserMessage(contents=[TextPart(text=text)])]
    made = [
        Event.emit("startRun", "j1", "r1", "e", 1, initialCheckpoint=checkpoint(1), inputMessages=asked),
        Event.emit("callTools", "j1", "r1", "e", 1, newMessage=said, toolCalls=[call], usage=Usage()),
        Event.emit("completeRun", "j1", "r1", "e", 2, checkpoint=cp, step=Step(step_number=2), text=text),
        Event.emit(
            "stopRunByError",
            "j1",
            "r1",
            "e",
            2,
            checkpoint=failed,
            step=Step(step_number=2),
            error=failed.error,
        ),
    ]
    # read back as a stream or a store has them; a step's end with its checkpoint whole
    read = [read_event(e.to_json()) for e in made[:2]]
    read += [read_event(json.dumps(e.to_dict() | {"checkpoint": e.checkpoint.to_dict()})) for e in made[2:]]
    assert [type(e) for e in read] == [type(e) for e in made]
    for event in made + read:
        assert json.loads(live_line(event)) == _live_by_parsing(event), (event.type, event.was_read)


@pytest.mark.parametrize("root", [PERSTACK_STORE, OLD_STORE], ids=["perstack", "older-perq"])
def test_stores_written_by_others_read_as_perqs_types(root: Path, tmp_path: Path) -> None:
    if not root.is_dir():
        pytest.skip(f"{root} is not there")
    shutil.copytree(root, tmp_path / "perstack")  # read on a copy: the store may write beside what it reads
    store = JobStore.open(str(tmp_path / "perstack"))
    seen: set[str] = set()
    for job_id in store.backend.list("jobs"):
        for run_id in store.list_runs(job_id):
            events, problems = store.read_events(job_id, run_id)
            assert problems == []
            assert not [e for e in events if isinstance(e, UnknownEvent)]
            seen |= {e.type for e in events}
    assert {"startRun", "callTools", "completeRun"} <= seen


def test_skill_events_are_typed_from_their_emitters() -> None:
    """The skill servers' emitters pass plain values by keyword; each event becomes its type, validated."""
    info = {"name": "s", "version": "1"}
    event = Event.build(
        "skillConnected", "j1", "r1", "e", 1, skillName="s", serverInfo=info, spawnDurationMs=4
    )
    assert isinstance(event, SkillConnected) and event.server_info is not None
    assert (event.server_info.name, event.spawn_duration_ms, event.step_number) == ("s", 4, 1)
    with pytest.raises(TypeError, match="serverinfo"):
        Event.build("skillConnected", "j1", "r1", "e", 1, skillName="s", serverinfo=info)
    with pytest.raises(ValidationError):
        Event.build("skillStderr", "j1", "r1", "e", 1, message="no skill named")


# a completeRun as an older perq worker put it on the live stream: its checkpoint cut to id, status, step
# and usage, without the jobId, runId and expert a typed checkpoint needs
OLDER_WORKERS_LIVE_LINE = (
    '{"id":"y3tly3tbk6alq66fkmfc65ix","type":"completeRun","timestamp":1796051012848,"jobId":"j","runId":"r",'
    '"expertKey":"e","stepNumber":2,"checkpoint":{"id":"c1","status":"completed","stepNumber":2,'
    '"usage":{"inputTokens":5,"outputTokens":7,"reasoningTokens":0,"totalTokens":12,"cachedInputTokens":0}},'
    '"text":"done"}'
)


def test_an_older_workers_live_step_end_still_settles_the_job() -> None:
    from producer.follow import Progress, job_status_after

    event = read_event(OLDER_WORKERS_LIVE_LINE)
    assert misfit(event)  # it does not fit the typed checkpoint...
    assert job_status_after(event) == "completed"  # ...and still says how the job ended
    progress = Progress()
    progress.update(event)
    assert (progress.status, progress.step, progress.usage.total_tokens) == ("completed", 2, 12)
    # a delegate's end settles nothing: its parent goes on
    delegated = json.loads(OLDER_WORKERS_LIVE_LINE)
    delegated["checkpoint"]["delegatedBy"] = {"expert": {"key": "p", "name": "p", "version": "1"}}
    assert job_status_after(read_event(delegated)) is None


def test_a_read_event_keeps_the_keys_it_was_written_with() -> None:
    stored = {
        "id": "e1",
        "type": "completeRun",
        "timestamp": 1,
        "jobId": "j",
        "runId": "r",
        "expertKey": "e",
        "stepNumber": 1,
        "text": "done",
        "checkpoint": {
            "id": "c1",
            "jobId": "j",
            "runId": "r",
            "status": "completed",
            "stepNumber": 1,
            "expert": {"key": "e", "name": "e", "version": "1"},
            "messagesRef": {"runId": "r", "token": "t", "count": 3},
        },
        "step": {"stepNumber": 1, "startedAt": 1},
    }
    event = read_event(stored)
    assert isinstance(event, CompleteRun)
    # the conversation is in the message log, not empty: no defaults are added on the way out
    assert event.to_dict() == stored
    assert json.loads(event.to_json()) == stored
