"""The worker's Runtime driven in-process (no Redis, no processes): hand-over rules that are hard to reach
with real workers, such as a finished step run again, or delegates nested inside a parallel branch."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

import pytest

from shared.models import Job, Usage
from shared.store import JobStore
from shared.store.backend import Steps
from tests.conftest import Perq
from worker import runtime
from worker.journal import QueueAnswerJournal
from worker.loop import StepInterrupted
from worker.models.contract import GenerationRequest, GenerationResult
from worker.models.script import ScriptModel
from worker.runtime import Runtime
from worker.skills import toolset
from worker.skills.base import ContentPart, ToolContext
from worker.step_queue import HandOver, LocalQueue


def setup(local: Perq, config: str, script: dict[str, list[dict[str, object]]]) -> Perq:
    local.write("perstack.toml", config)
    local.script(script)
    return local


def u(i: int, o: int) -> dict[str, int]:
    return {"inputTokens": i, "outputTokens": o}


async def test_a_finished_step_run_again_does_not_roll_the_job_back(local: Perq) -> None:
    h = setup(
        local,
        '[experts.e]\ninstruction = "x"\n',
        {
            "e": [
                {"toolCalls": [{"toolName": "healthCheck"}]},
                {"toolCalls": [{"toolName": "healthCheck"}]},
                {"text": "done"},
            ]
        },
    )
    job = h.start("e", "go")
    await h.drain()
    before = h.job(job.id)
    assert before.status == "completed" and before.total_steps == 3
    # a worker that died before arq knew the step had finished: the step is run again, much later
    await h.runtime.run_step(h.ran[0], attempt=2)
    await h.drain()
    after = h.job(job.id)
    assert after == before
    assert not h.local.pending


async def test_a_sequential_delegate_inside_a_parallel_branch_counts_once(local: Perq) -> None:
    config = """
[experts.coord]
instruction = "x"
delegates = ["alpha", "beta"]
[experts.alpha]
description = "a"
instruction = "x"
delegates = ["gamma"]
[experts.beta]
description = "b"
instruction = "x"
[experts.gamma]
description = "g"
instruction = "x"
"""
    h = setup(
        local,
        config,
        {
            "coord": [
                {
                    "toolCalls": [
                        {"toolName": "alpha", "args": {"query": "a"}},
                        {"toolName": "beta", "args": {"query": "b"}},
                    ],
                    "usage": u(100_000, 1),
                },
                {"text": "all done", "usage": u(1, 1)},
            ],
            "alpha": [
                {"toolCalls": [{"toolName": "gamma", "args": {"query": "g"}}], "usage": u(1_000, 1)},
                {"text": "alpha done", "usage": u(10, 1)},
            ],
            "gamma": [{"text": "gamma done", "usage": u(100, 1)}],
            "beta": [{"text": "beta done", "usage": u(10_000, 1)}],
        },
    )
    job = h.start("coord", "go")
    await h.drain()
    final = h.job(job.id)
    assert final.status == "completed"
    # every model answer counted exactly once: 100000 + 1000 + 100 + 10 + 10000 + 1
    assert final.usage == Usage(input_tokens=111_111, output_tokens=6, total_tokens=111_117)


async def test_a_parallel_delegate_at_max_steps_stops_the_job(local: Perq) -> None:
    config = """
[experts.coord]
instruction = "x"
delegates = ["alpha", "beta"]
[experts.alpha]
description = "a"
instruction = "x"
[experts.beta]
description = "b"
instruction = "x"
"""
    h = setup(
        local,
        config,
        {
            "coord": [
                {
                    "toolCalls": [
                        {"toolName": "alpha", "args": {"query": "a"}},
                        {"toolName": "beta", "args": {"query": "b"}},
                    ]
                },
                {"text": "never"},
            ],
            "alpha": [{"toolCalls": [{"toolName": "healthCheck"}]}] * 5,
            "beta": [{"text": "beta done"}],
        },
    )
    job = h.start("coord", "go", max_steps=3)
    await h.drain()
    final = h.job(job.id)
    assert final.status == "stoppedByMaxSteps"
    assert final.finished_at is not None


async def test_cancel_stops_earlier_submissions_only(local: Perq) -> None:
    h = setup(
        local,
        '[experts.e]\ninstruction = "x"\n',
        {
            "e": [
                {"toolCalls": [{"toolName": "healthCheck"}]},
                {"toolCalls": [{"toolName": "healthCheck"}]},
                {"text": "done"},
                {"text": "again"},
            ]
        },
    )
    job = h.start("e", "go")
    first = h.local.pending.popleft()
    await h.runtime.run_step(first)
    # cancelled after step 1: the step queued next belongs to the cancelled submission and does not run
    record = h.job(job.id)
    record.status = "cancelled"
    h.store.save_job(record)
    h.local.cancelled[job.id] = h.store.load_run_setting(job.id, first.run_id).epoch + 1  # type: ignore[union-attr]
    await h.drain()
    assert h.job(job.id).status == "cancelled" and h.job(job.id).total_steps == 1
    # a continuation is a new submission: it runs although the cancel mark stays
    h.start("e", "carry on", continue_job=job.id)
    h.local.cancelled[job.id] -= 1  # the mark predates the continuation's epoch
    await h.drain()
    assert h.job(job.id).status == "completed"


async def test_a_delegate_stopped_at_max_steps_is_recorded_when_its_step_is_found_done(local: Perq) -> None:
    """The worker died between a delegate's last checkpoint and the job record: the step's re-run finds the
    checkpoint, and the record must still learn that the job stopped (else it stays running forever)."""
    config = """
[experts.coord]
instruction = "x"
delegates = ["alpha"]
[experts.alpha]
description = "a"
instruction = "x"
"""
    h = setup(
        local,
        config,
        {
            "coord": [{"toolCalls": [{"toolName": "alpha", "args": {"query": "a"}}]}, {"text": "never"}],
            "alpha": [{"toolCalls": [{"toolName": "healthCheck"}]}] * 5,
        },
    )
    job = h.start("coord", "go", max_steps=3)
    await h.drain()
    stopped = h.job(job.id)
    assert stopped.status == "stoppedByMaxSteps"
    # the record as it was before the last step's write, which the crash lost
    h.store.save_job(stopped.model_copy(update={"status": "running", "finished_at": None}))
    await h.runtime.run_step(h.ran[-1], attempt=2)
    assert h.job(job.id).status == "stoppedByMaxSteps"
    assert not h.local.pending


@pytest.mark.parametrize("looks_again", [True, False], ids=["ran-long", "ran-short"])
async def test_two_attempts_of_a_step_commit_once_and_a_long_one_writes_nothing(
    local: Perq, monkeypatch: pytest.MonkeyPatch, looks_again: bool
) -> None:
    """Two attempts of one step run together (one paused past its lease, the other took the step over):
    one commits, the other adopts its checkpoint. An attempt that ran long looks again before it commits
    and writes nothing; a short one is not expected to have lost a race, writes its lines under its own
    token and loses the create-only commit: readers see one attempt either way."""
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [{"text": "done", "delayMs": 300}]})
    monkeypatch.setattr(runtime, "LOOK_AGAIN_AFTER_S", 0.2 if looks_again else 60.0)
    job = h.start("e", "go")
    task = h.local.pending.popleft()
    generate = ScriptModel.generate
    second_asked = asyncio.Event()
    asked: list[bool] = []  # whether it was the first attempt, each time the model was asked

    async def answered_in_order(self: ScriptModel, request: GenerationRequest) -> GenerationResult:
        """The first attempt's answer waits until the second has looked for the step's checkpoint (found
        none) and asked the model; the second's answer until the first attempt's step is done, commit
        included, however long its flush takes (a syncfs behind a busy disk: tenths of a second). Each
        attempt generates in its own task."""
        by_first = asyncio.current_task() is first
        asked.append(by_first)
        if not by_first:
            second_asked.set()
        result = await generate(self, request)  # the turn's 300 ms: the second attempt runs long
        if by_first:
            await second_asked.wait()
        else:
            await asyncio.wait({first})
        return result

    monkeypatch.setattr(ScriptModel, "generate", answered_in_order)
    first = asyncio.create_task(h.runtime.run_step(task))
    await asyncio.sleep(0.1)
    h.runtime._checkpoints.clear()  # the other attempt is another worker's: it shares no cache
    second = await h.runtime.run_step(task, attempt=2)
    ended = await first
    assert ended is not None and second is not None and ended.id == second.id
    assert [c.id for c in h.checkpoints(job.id)] == [ended.id]
    assert [e.type for e in h.events(job.id)] == ["startRun", "startGeneration", "completeRun"]
    run_log = h.storage / "jobs" / job.id / "runs" / task.run_id / "events.jsonl"
    written = len(run_log.read_bytes().splitlines())
    assert written == (3 if looks_again else 6)  # no lines of the late attempt, or its three
    assert h.job(job.id).status == "completed" and h.job(job.id).total_steps == 1
    assert sorted(asked) == [False, True]  # each attempt asked the model once


def records_at_hand_over(h: Perq, job_id: str) -> list[tuple[str, int]]:
    """The job record's status and total steps as each in-process hand-over finds it, from now on."""
    seen: list[tuple[str, int]] = []
    hand_over = h.local.hand_over

    async def noting(handed: HandOver) -> bool:
        record = h.job(job_id)
        seen.append((record.status, record.total_steps))
        return await hand_over(handed)

    h.local.hand_over = noting  # type: ignore[method-assign]
    return seen


async def test_a_running_jobs_record_is_refreshed_after_its_step_hands_on(
    local: Perq, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that only says the job runs (and its totals so far) is written once the step handed on,
    so the hand-over does not wait on the record's flushes; a run's end is recorded before its hand-over."""
    tool = {"toolCalls": [{"toolName": "healthCheck"}]}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [tool, tool, {"text": "done"}]})
    h.runtime.record_interval_s = 3600  # step 2 comes within the interval, however slow the disk
    job = h.start("e", "go")
    at_hand_over = records_at_hand_over(h, job.id)
    writes = count_record_writes(h, monkeypatch)
    await h.step()
    assert at_hand_over == [("queued", 0)]
    assert (h.job(job.id).status, h.job(job.id).total_steps) == ("running", 1)  # written after the hand-over
    await h.drain()
    # step 2 comes within the refresh interval (no write); the end is in the record before it is published
    assert at_hand_over == [("queued", 0), ("running", 1), ("completed", 3)]
    assert writes == [1, 3]


def count_record_writes(h: Perq, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The steps (by the records' totals once written) whose job record the runtime wrote."""
    writes: list[int] = []
    update = h.runtime.store.update_job_steps

    def noted(job_id: str, change: Callable[[Job], Job | None]) -> Steps[Job | None]:
        job = yield from update(job_id, change)
        writes.append(job.total_steps if job else -1)
        return job

    monkeypatch.setattr(h.runtime.store, "update_job_steps", noted)
    return writes


async def test_without_shared_flushes_a_refresh_is_written_before_the_hand_over(local: Perq) -> None:
    """Deferring a refresh saves flushes only where they are shared (a local disk with syncfs), and is
    safe only where the record is locked: elsewhere (S3, or no flushes at all) the record is written before
    the hand-over, as every record is."""
    tool = {"toolCalls": [{"toolName": "healthCheck"}]}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [tool, {"text": "done"}]})
    h.runtime = Runtime(store=JobStore.open(str(h.storage), fsync=False), queue=h.local)
    job = h.start("e", "go")
    at_hand_over = records_at_hand_over(h, job.id)
    await h.drain()
    assert at_hand_over == [("running", 1), ("completed", 2)]


async def test_a_refresh_that_fails_is_logged_and_the_job_goes_on(
    local: Perq, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The step is committed and handed on before its refresh: a store error in the refresh must not fail
    the step (a retry would run a step that was handed on); the next record says it all again."""
    h = setup(
        local,
        '[experts.e]\ninstruction = "x"\n',
        {"e": [{"toolCalls": [{"toolName": "healthCheck"}]}, {"text": "done"}]},
    )
    job = h.start("e", "go")
    update = h.runtime.store.update_job_steps
    failures = [OSError(28, "No space left on device")]

    def failing_once(job_id: str, change: Callable[[Job], Job | None]) -> Steps[Job | None]:
        if failures:
            raise failures.pop()
        return update(job_id, change)

    monkeypatch.setattr(h.runtime.store, "update_job_steps", failing_once)
    with caplog.at_level(logging.WARNING, logger="perq.worker"):
        ended = await h.step()
    assert ended is not None and ended.step_number == 1 and not failures
    assert "could not refresh the record" in caplog.text and "No space left" in caplog.text
    assert [t.step_number for t in h.local.pending] == [2]
    assert h.job(job.id).status == "queued"  # the refresh was lost
    await h.drain()
    assert (h.job(job.id).status, h.job(job.id).total_steps) == ("completed", 2)


class HeldAnswers:
    """The queue's answer journal held until released (a slow Redis), or failing (an unreachable one)."""

    def __init__(self, queue: LocalQueue, fails: bool = False) -> None:
        self.queue, self.fails = queue, fails
        self.release = asyncio.Event()
        self.saved: list[str] = []

    async def save_answer(self, key: str, data: bytes) -> None:
        await self.release.wait()
        if self.fails:
            raise ConnectionError("redis went away")
        self.saved.append(key)
        await LocalQueue.save_answer(self.queue, key, data)


def hold_answers(h: Perq, monkeypatch: pytest.MonkeyPatch, *, fails: bool = False) -> HeldAnswers:
    """Route the in-process queue's journal through a `HeldAnswers`."""
    held = HeldAnswers(h.local, fails)
    monkeypatch.setattr(h.local, "save_answer", held.save_answer)
    return held


def journal_waited(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once a step waits for an answer still on its way to the journal."""
    waited = asyncio.Event()
    recorded = QueueAnswerJournal.recorded

    async def noting(self: QueueAnswerJournal) -> None:
        if self._saving:
            waited.set()
        await recorded(self)

    monkeypatch.setattr(QueueAnswerJournal, "recorded", noting)
    return waited


def note_base_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The base tools called from now on, by name, in order."""
    called: list[str] = []
    call_base_tool = toolset.call_base_tool

    async def noting(name: str, args: dict[str, object], ctx: ToolContext) -> list[ContentPart]:
        called.append(name)
        return await call_base_tool(name, args, ctx)

    monkeypatch.setattr(toolset, "call_base_tool", noting)
    return called


@pytest.mark.parametrize("tool", ["readTextFile", "writeTextFile"])
async def test_only_a_tool_that_changes_nothing_runs_before_its_answer_is_journaled(
    local: Perq, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    """A read-only base tool runs while the answer is still being journaled; a tool that may change the
    world waits for it (a re-run would otherwise ask again and do something else); nothing is committed
    before the answer is journaled, whatever the tool."""
    args = {"path": "notes.txt"} | ({"text": "hello"} if tool == "writeTextFile" else {})
    call = {"toolCalls": [{"toolName": tool, "args": args}]}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [call, {"text": "done"}]})
    h.write("notes.txt", "old")
    job = h.start("e", "go")
    held = hold_answers(h, monkeypatch)
    called = note_base_calls(monkeypatch)
    waited = journal_waited(monkeypatch)
    stepping = asyncio.create_task(h.step())
    await asyncio.wait_for(waited.wait(), 10)  # at the commit (the read ran), or before the write
    assert called == ([tool] if tool == "readTextFile" else [])
    assert not stepping.done() and not h.checkpoints(job.id)
    held.release.set()
    ended = await stepping
    assert ended is not None and ended.step_number == 1 and called == [tool] and len(held.saved) == 1
    assert (h.root / "notes.txt").read_text() == ("hello" if tool == "writeTextFile" else "old")
    assert not h.local.answers  # forgotten at the hand-over, once recorded


async def test_an_answer_that_cannot_be_journaled_commits_nothing(
    local: Perq, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-only tool ran, but the answer never reached the journal: the step is interrupted (run again
    later, asking the model again), and commits and hands on nothing."""
    call = {"toolCalls": [{"toolName": "readTextFile", "args": {"path": "notes.txt"}}]}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [call, {"text": "done"}]})
    h.write("notes.txt", "old")
    job = h.start("e", "go")
    held = hold_answers(h, monkeypatch, fails=True)
    called = note_base_calls(monkeypatch)
    waited = journal_waited(monkeypatch)
    stepping = asyncio.create_task(h.step())
    await asyncio.wait_for(waited.wait(), 10)
    assert called == ["readTextFile"]  # ran while the answer was on its way
    held.release.set()
    with pytest.raises(StepInterrupted, match="cannot journal the answer"):
        await stepping
    assert not h.checkpoints(job.id)
    assert not h.local.pending and not h.local.published


async def test_a_save_still_on_its_way_is_stopped_with_its_step(
    local: Perq, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step cut short (a worker's shutdown) while a read-only tool runs and its answer is still on its way
    to the journal does not wait for the save: it is cancelled with the step."""
    call = {"toolCalls": [{"toolName": "readTextFile", "args": {"path": "notes.txt"}}]}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [call, {"text": "done"}]})
    h.start("e", "go")
    held = hold_answers(h, monkeypatch)
    reading = asyncio.Event()

    async def slow_read(name: str, args: dict[str, object], ctx: ToolContext) -> list[ContentPart]:
        reading.set()
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    monkeypatch.setattr(toolset, "call_base_tool", slow_read)
    stepping = asyncio.create_task(h.step())
    await asyncio.wait_for(reading.wait(), 5)
    stepping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stepping
    held.release.set()
    await asyncio.sleep(0.05)
    assert not held.saved and not h.local.answers


@pytest.mark.parametrize("served", [False, True], ids=["in-process", "served-by-a-base-server"])
async def test_attempt_completion_waits_for_its_answer_only_where_it_may_change_anything(
    local: Perq, monkeypatch: pytest.MonkeyPatch, served: bool
) -> None:
    """perq's own attemptCompletion changes nothing and runs at once; served by a base server of the user's
    own (`perstackBaseSkillCommand`, which `SkillSet.changes_nothing` tells apart: tests/test_base_tools.py)
    it is an MCP tool like any other and waits for its answer's record."""
    call = {"toolCalls": [{"toolName": "attemptCompletion"}], "text": "all done"}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [call]})
    job = h.start("e", "go")
    held = hold_answers(h, monkeypatch)
    if served:
        monkeypatch.setattr(toolset.SkillSet, "changes_nothing", lambda self, call: False)
    called = note_base_calls(monkeypatch)
    waited = journal_waited(monkeypatch)
    stepping = asyncio.create_task(h.step())
    await asyncio.wait_for(waited.wait(), 10)
    assert called == ([] if served else ["attemptCompletion"])
    held.release.set()
    ended = await stepping
    assert ended is not None and ended.status == "completed" and called == ["attemptCompletion"]
    assert h.job(job.id).status == "completed"


async def test_a_step_whose_answer_cannot_be_journaled_asks_the_model_no_more(
    local: Perq, monkeypatch: pytest.MonkeyPatch
) -> None:
    """attemptCompletion without a text sends the step back to the model for its final answer: that second
    request waits for the first answer's record, and when the record fails the model is not asked again
    (the step runs again later instead)."""
    completion = {"toolCalls": [{"toolName": "attemptCompletion"}]}
    h = setup(local, '[experts.e]\ninstruction = "x"\n', {"e": [completion, {"text": "final"}]})
    h.start("e", "go")
    held = hold_answers(h, monkeypatch, fails=True)
    asked: list[str] = []
    generate = ScriptModel.generate

    async def counting(self: ScriptModel, request: GenerationRequest) -> GenerationResult:
        asked.append(request.expert_key)
        return await generate(self, request)

    monkeypatch.setattr(ScriptModel, "generate", counting)
    waited = journal_waited(monkeypatch)
    stepping = asyncio.create_task(h.step())
    await asyncio.wait_for(waited.wait(), 10)
    assert asked == ["e"]  # the final answer is not asked for before the first answer is recorded
    held.release.set()
    with pytest.raises(StepInterrupted):
        await stepping
    assert asked == ["e"]


def test_the_collector_is_set_for_steps_only_inside_collector_for_steps() -> None:
    """A worker runs its steps inside it, and so does the bench's in-process baseline; the bench's other
    figures, after it, run with the collector as it was, even when what ran inside failed."""
    original = gc.get_threshold()
    try:
        gc.set_threshold(1234, 5, 6)
        with pytest.raises(RuntimeError), runtime.collector_for_steps():
            assert gc.get_threshold() == runtime.GC_THRESHOLDS and gc.get_freeze_count() > 0
            raise RuntimeError("a step failed")
        assert gc.get_threshold() == (1234, 5, 6) and gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*original)
