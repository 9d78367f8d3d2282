"""`perq log`'s filter language, pagination, summary, selection and rendering, over synthetic events."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from producer.log_query import (
    CheckpointNotFound,
    LogError,
    LogFilters,
    LogSelection,
    apply_filters,
    parse_condition,
    parse_step_filter,
    select,
    summarize,
)
from producer.views.log import event_lines, print_log, render_json
from shared.models import STEP_ENDING_EVENTS, Checkpoint, Event, ExpertRef, Job, Usage
from shared.store import JobStore

JOB = "job1"
RUN = "run1"


def ev(type_: str, step: int | None = 1, ts: int = 1_000, run: str = RUN, **payload: Any) -> Event:
    """An event of the type; a payload it requires and the test does not give is a plain stand-in."""
    base: dict[str, Any] = {"type": type_, "jobId": JOB, "runId": run, "expertKey": "e", "stepNumber": step}
    base["timestamp"] = ts
    expert = {"key": "e", "name": "e"}
    checkpoint: dict[str, Any] = {"id": f"cp{step}", "jobId": JOB, "runId": run, "expert": expert}
    checkpoint["status"] = "proceeding"
    checkpoint["stepNumber"] = step or 0
    if type_ == "startRun":
        base["initialCheckpoint"] = checkpoint
    elif type_ in STEP_ENDING_EVENTS:
        base["checkpoint"] = checkpoint
    elif type_.startswith("skill"):
        base["skillName"] = "s"
    return Event.model_validate(base | payload)


def call(name: str, **args: Any) -> dict[str, Any]:
    return {"id": f"call-{name}", "skillName": "@perstack/base", "toolName": name, "args": args}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "textPart", "id": "p", "text": text}


EVENTS = [
    ev("startRun", 1, 1, inputMessages=[{"type": "userMessage", "id": "m", "contents": [text_part("hi")]}]),
    ev("startGeneration", 1, 2),
    ev("callTools", 1, 3, toolCalls=[call("readTextFile", path="a.txt"), call("exec", command="ls")]),
    ev("resolveToolResults", 1, 4, toolResults=[]),
    ev("continueToNextStep", 1, 5),
    ev("retry", 2, 6, reason="rate limited"),
    ev("callDelegate", 2, 7, toolCalls=[call("helper", query="do it")]),
    ev("stopRunByDelegate", 2, 8),
    ev("callInteractiveTool", 3, 9, toolCall=call("askUser")),
    ev("stopRunByError", 4, 10, error={"name": "APIError", "message": "boom", "isRetryable": False}),
    ev("completeRun", 5, 11, text="done", usage={"inputTokens": 5}),
]


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def only(**kwargs: Any) -> list[str]:
    return types(apply_filters(EVENTS, LogFilters(**kwargs)).events)


# --- --step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("2", [2]),
        (">3", [4, 5]),
        (">=3", [3, 4, 5]),
        ("<2", [1]),
        ("<=2", [1, 2]),
        ("2-4", [2, 3, 4]),
        (" 3 ", [3]),
    ],
)
def test_step_filter_forms(text: str, steps: list[int]) -> None:
    got = apply_filters(EVENTS, LogFilters(step=parse_step_filter(text))).events
    assert sorted({e.step_number for e in got if e.step_number is not None}) == steps


@pytest.mark.parametrize("text", ["", "x", "=3", ">>3", "1-", "-2", "3.5", "1-2-3", "5-2"])
def test_step_filter_rejects_garbage(text: str) -> None:
    with pytest.raises(LogError, match="Invalid step filter"):
        parse_step_filter(text)


def test_step_filter_never_selects_events_without_a_step() -> None:
    runtime = ev("skillConnected", None)
    assert apply_filters([runtime], LogFilters(step=parse_step_filter(">=0"))).events == []


# --- --type, --errors, --tools, --delegations -------------------------------------------------------


def test_type_and_category_filters() -> None:
    assert only(type="callTools") == ["callTools"]
    assert only(type="nope") == []
    assert only(errors=True) == ["retry", "stopRunByError"]
    assert only(tools=True) == ["callTools", "resolveToolResults", "callInteractiveTool"]
    assert only(delegations=True) == ["callDelegate", "stopRunByDelegate"]
    # filters combine: each one narrows what the one before it let through
    assert only(tools=True, step=parse_step_filter("1")) == ["callTools", "resolveToolResults"]
    assert only(errors=True, tools=True) == []


# --- --filter ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('.type == "completeRun"', ["completeRun"]),
        (".type == 'retry'", ["retry"]),
        (".type == retry", ["retry"]),  # an unquoted word is a string
        (".stepNumber > 3", ["stopRunByError", "completeRun"]),
        (".stepNumber >= 4", ["stopRunByError", "completeRun"]),
        (
            ".stepNumber < 2",
            ["startRun", "startGeneration", "callTools", "resolveToolResults", "continueToNextStep"],
        ),
        (
            ".stepNumber <= 1.5",
            ["startRun", "startGeneration", "callTools", "resolveToolResults", "continueToNextStep"],
        ),
        (".stepNumber == 3", ["callInteractiveTool"]),
        (".error.isRetryable == false", ["stopRunByError"]),
        ('.error.name != "APIError"', []),  # a missing field never matches, not even with !=
        ('.toolCalls[].toolName == "exec"', ["callTools"]),
        ('.toolCalls[].toolName != "exec"', ["callTools", "callDelegate"]),  # any element
        ('.toolCalls[].args.command == "ls"', ["callTools"]),
        ('.toolCall.toolName == "askUser"', ["callInteractiveTool"]),
        (".usage.inputTokens == 5", ["completeRun"]),
        ('.stepNumber == "3"', []),  # no coercion between numbers and strings
        (".stepNumber == true", []),
        ('.text > "a"', []),  # ordering compares numbers only
        ('.inputMessages[].contents[].text == "hi"', ["startRun"]),
    ],
)
def test_filter_expressions(expression: str, expected: list[str]) -> None:
    assert only(condition=parse_condition(expression)) == expected


@pytest.mark.parametrize("expression", ["type == x", ".type", ".type ==", ". == 1", ".type ~ 1", ".1a == 2"])
def test_filter_expression_rejects_garbage(expression: str) -> None:
    with pytest.raises(LogError, match="Invalid filter expression"):
        parse_condition(expression)


@pytest.mark.parametrize("expression", [".x[ == 1", ".a]b == 1", ".a[0] == 1"])
def test_filter_paths_allow_only_the_array_wildcard(expression: str) -> None:
    with pytest.raises(LogError, match="Invalid filter path"):
        parse_condition(expression)


def test_filter_values_parse_like_perstack() -> None:
    assert parse_condition(".a == true").value is True
    assert parse_condition(".a == false").value is False
    assert parse_condition(".a == 1e2").value == 100
    assert parse_condition('.a == "1"').value == "1"
    assert parse_condition(".a.b[].c >= -2.5").path == ("a", "b", "[]", "c")


# --- pagination and context -------------------------------------------------------------------------


def test_offset_then_take() -> None:
    result = apply_filters(EVENTS, LogFilters(take=3, offset=2))
    assert types(result.events) == ["callTools", "resolveToolResults", "continueToNextStep"]
    assert (result.total_before_pagination, result.matched_after_pagination) == (11, 3)
    assert len(apply_filters(EVENTS, LogFilters(take=0)).events) == 11  # 0 = all
    assert apply_filters(EVENTS, LogFilters(offset=50)).events == []
    many = [ev("startGeneration", i, i) for i in range(150)]
    assert len(apply_filters(many, LogFilters()).events) == 100  # take defaults to 100


def test_context_adds_neighbours_after_pagination() -> None:
    result = apply_filters(EVENTS, LogFilters(type="callDelegate", context=1))
    assert types(result.events) == ["retry", "callDelegate", "stopRunByDelegate"]
    assert (result.total_before_pagination, result.matched_after_pagination) == (1, 1)
    # overlapping windows are merged, at the edges they stop
    result = apply_filters(EVENTS, LogFilters(errors=True, context=2))
    assert types(result.events) == [
        "resolveToolResults",
        "continueToNextStep",
        "retry",
        "callDelegate",
        "stopRunByDelegate",
        "callInteractiveTool",
        "stopRunByError",
        "completeRun",
    ]
    result = apply_filters(EVENTS, LogFilters(type="startRun", context=3, take=1))
    assert types(result.events)[0] == "startRun" and len(result.events) == 4


@pytest.mark.parametrize("name", ["take", "offset", "context"])
def test_negative_pagination_is_refused(name: str) -> None:
    with pytest.raises(LogError, match=f"--{name}"):
        LogFilters(**{name: -1})


def test_summary_counts() -> None:
    assert summarize(EVENTS) == {
        "totalEvents": 11,
        "errorCount": 2,
        "toolCallCount": 3,
        "delegationCount": 2,
        "stepRange": {"min": 1, "max": 5},
    }
    assert summarize([]) == {"totalEvents": 0, "errorCount": 0, "toolCallCount": 0, "delegationCount": 0}


# --- one event on the terminal ---------------------------------------------------------------------


def lines_of(event: Event, verbose: bool = False) -> list[str]:
    return [t.plain for t in event_lines(event, verbose=verbose)]


def test_event_lines_show_step_type_time_and_details() -> None:
    first = lines_of(EVENTS[0])
    assert first[0].startswith("[Step 1] startRun" + " " * 16)
    assert first[1] == '  Query: "hi"'
    assert lines_of(EVENTS[2])[1] == "  Tools: readTextFile, exec"
    verbose = lines_of(EVENTS[2], verbose=True)
    assert "  [@perstack/base] readTextFile" in verbose
    assert '    Args: {"path": "a.txt"}' in verbose
    assert lines_of(EVENTS[5])[1] == "  Reason: rate limited"
    assert lines_of(EVENTS[6])[1] == "  Delegate to: helper"
    assert lines_of(EVENTS[9])[1:4] == ["  Error: APIError", "  Message: boom", "  Retryable: false"]
    assert lines_of(EVENTS[10])[1] == "  Result: done"
    results = ev(
        "resolveToolResults",
        toolResults=[
            {"id": "1", "skillName": "s", "toolName": "ok", "result": [text_part("fine")]},
            {
                "id": "2",
                "skillName": "s",
                "toolName": "bad",
                "result": [text_part("Error: no such file " * 3)],
            },
        ],
    )
    shown = lines_of(results)
    assert shown[1] == "  ✓ ok: fine"
    assert shown[2].startswith("  ✗ bad: Error: no such file") and shown[2].endswith("...")
    assert lines_of(ev("skillConnected", None))[0].startswith("[Step -] skillConnected")


# --- selection over a store ------------------------------------------------------------------------


def make_store(tmp_path: Path, *, with_job: bool = True) -> JobStore:
    store = JobStore.open(str(tmp_path / "perstack"))
    expert = ExpertRef(key="e", name="e")
    if with_job:
        job = Job(id=JOB, status="completed", coordinator_expert_key="e", total_steps=5, started_at=1_000)
        store.save_job(job, new=True)
    for step, status in ((1, "proceeding"), (5, "completed")):
        store.save_checkpoint(
            Checkpoint(
                id=f"cp{step}",
                job_id=JOB,
                run_id=RUN if step == 1 else "run2",
                status=status,  # type: ignore[arg-type]
                step_number=step,
                expert=expert,
                usage=Usage(input_tokens=step),
            )
        )
    store.append_events(JOB, RUN, [e for e in EVENTS if e.step_number is not None and e.step_number < 3])
    # a second run whose clock is behind: it keeps its own order, merged by time with the first
    late = [ev("startRun", 3, 0, run="run2"), ev("completeRun", 5, 20, run="run2", text="late")]
    store.append_events(JOB, "run2", late)
    return store


def test_select_job_merges_runs_by_time_and_lists_checkpoints(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    out = select(store, LogSelection(job=JOB), LogFilters(take=0))
    assert out is not None and not out.is_latest_job
    assert types(out.events)[0] == "startRun" and out.events[0].run_id == "run2"
    assert types(out.events)[-1] == "completeRun" and out.events[-1].run_id == "run2"
    assert [c.id for c in out.checkpoints or []] == ["cp1", "cp5"]
    data = json.loads(render_json(out, pretty=False))
    assert set(data) >= {"job", "events", "summary", "checkpoints", "storagePath", "totalEventsBeforeLimit"}
    assert data["matchedAfterPagination"] == len(data["events"]) == 10
    assert "\n" not in render_json(out, pretty=False) and "\n  " in render_json(out, pretty=True)


def test_select_latest_run_and_checkpoint(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    latest = select(store, LogSelection(), LogFilters())
    assert latest is not None and latest.is_latest_job and latest.job.id == JOB
    assert json.loads(render_json(latest, pretty=False))["isLatestJob"] is True
    run = select(store, LogSelection(run="run2"), LogFilters())
    assert run is not None and types(run.events) == ["startRun", "completeRun"]
    cp = select(store, LogSelection(job=JOB, checkpoint="cp1"), LogFilters(errors=True))
    assert cp is not None and cp.checkpoint is not None and cp.checkpoint.id == "cp1"
    assert types(cp.events) == ["retry"]
    with pytest.raises(CheckpointNotFound, match="checkpoint not found: nope"):
        select(store, LogSelection(checkpoint="nope"), LogFilters())
    with pytest.raises(ValueError, match="invalid run id"):
        select(store, LogSelection(run="../x"), LogFilters())


def test_nothing_found(tmp_path: Path) -> None:
    empty = JobStore.open(str(tmp_path / "empty"))
    for selection in (
        LogSelection(),
        LogSelection(job="nope"),
        LogSelection(run="r"),
        LogSelection(checkpoint="c"),
    ):
        assert select(empty, selection, LogFilters(errors=True)) is None
    assert select(make_store(tmp_path), LogSelection(job="other"), LogFilters()) is None
    assert select(make_store(tmp_path), LogSelection(run="no-such-run"), LogFilters()) is None


def test_job_without_record_is_made_up_from_checkpoints(tmp_path: Path) -> None:
    store = make_store(tmp_path, with_job=False)
    out = select(store, LogSelection(), LogFilters())
    assert out is not None
    assert (out.job.id, out.job.status, out.job.total_steps, out.job.coordinator_expert_key) == (
        JOB,
        "completed",
        5,
        "e",
    )
    assert out.job.usage.input_tokens == 5


def test_terminal_layout(tmp_path: Path) -> None:
    out = select(make_store(tmp_path), LogSelection(checkpoint="cp1"), LogFilters(take=1))
    assert out is not None
    console = Console(record=True, width=200, file=io.StringIO())
    print_log(console, out, summary=True, messages=True)
    text = console.export_text()
    assert "(showing latest job)" in text
    assert f"Job: {JOB} (completed)" in text
    assert "Checkpoint: cp1\nStatus: proceeding\nStep: 1\nExpert: e" in text
    assert "Messages:" in text
    assert "Summary:\n  Total Events: 1" in text
    assert "Events:\n" + "─" * 50 + "\n[Step 1] startRun" in text
    assert "(showing 1 of 8 matched events)" in text
    assert "Use --take and --offset to paginate, or --take 0 for all" in text
