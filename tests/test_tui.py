"""`perq start` driven by Textual's headless pilot against a real Redis and real worker processes.

Every assertion reads what the widgets show (list lines, log lines, messages, the footer's keys) or what
the store holds afterwards; no snapshot files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("textual")

from textual.pilot import Pilot
from textual.widgets import Input, OptionList, RichLog, Static

from producer.api import RunRequest
from producer.tui.app import (
    CheckpointsScreen,
    ConfirmScreen,
    EventScreen,
    EventsScreen,
    HistoryScreen,
    LiveScreen,
    NewRunScreen,
    QueryScreen,
    StartApp,
)
from shared.config import RedisSection, Settings, StoreSection
from shared.models import FinishAllToolCalls, Job, TextPart, ToolMessage, Usage, now_ms
from tests.conftest import Perq, script_toml
from tests.support.configs import asker_toml

CONFIG = """
[experts.hello]
description = "Greets the user"
instruction = "Say hello"
""" + asker_toml(description="Asks the user")

HELLO_TURNS: list[dict[str, Any]] = [
    {"toolCalls": [{"toolName": "todo", "args": {"newTodos": ["say hello"]}}], "usage": {"inputTokens": 120}},
    {"toolCalls": [{"toolName": "todo", "args": {"completedTodos": [0]}}]},
    {"toolCalls": [{"toolName": "attemptCompletion", "args": {}}]},
    {"text": "Hello!"},
    {"text": "Hello again!"},  # a continuation's answer
]
SIZE = (140, 40)
WAIT_S = 60  # how long a view may take to show what a real worker produced before the test gives up


def setup(perq: Perq, asker: list[dict[str, Any]] | None = None) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"hello": HELLO_TURNS, "asker": asker or [{"text": "ok"}]}))


def make_app(perq: Perq, *, redis_url: str | None = None, **options: Any) -> StartApp:
    """`perq start [options]` in this test's installation (its store, queue and Redis)."""
    request = RunRequest(
        expert_key=options.pop("expert_key", ""),
        query=options.pop("query", ""),
        config=str(perq.root / "perstack.toml"),
        provider="script",
        model="script.toml",
        cwd=perq.root,
        **options,
    )
    settings = Settings(
        redis=RedisSection(url=redis_url or perq.redis.url, queue=perq.queue),
        store=StoreSection(location=str(perq.storage)),
    )
    return StartApp(request, settings)


def plain(visual: Any) -> str:
    return str(getattr(visual, "plain", visual))


def shown(app: StartApp) -> str:
    """The text of the current view: titles and messages, list lines, log lines, the input's prompt."""
    parts: list[str] = []
    for widget in app.screen.query("*"):
        if isinstance(widget, OptionList):
            parts += [plain(widget.get_option_at_index(i).prompt) for i in range(widget.option_count)]
        elif isinstance(widget, RichLog):
            parts += [strip.text for strip in widget.lines]
        elif isinstance(widget, Input):
            if widget.display:
                parts += [widget.placeholder, widget.value]
        elif isinstance(widget, Static):
            parts.append(plain(widget.render()))
    return "\n".join(parts)


def lines_of(app: StartApp) -> list[str]:
    picker = app.screen.query_one(OptionList)
    return [plain(picker.get_option_at_index(i).prompt) for i in range(picker.option_count)]


def footer_keys(app: StartApp) -> dict[str, str]:
    """What the footer shows: key (as displayed) -> description."""
    keys = {}
    for active in app.screen.active_bindings.values():
        if active.binding.show:
            keys[app.get_key_display(active.binding)] = active.binding.description
    return keys


async def until(pilot: Pilot[Any], what: str, check: Callable[[], bool]) -> None:
    """Let the app run until `check()` holds; fail saying what never appeared."""
    for _ in range(int(WAIT_S / 0.05)):
        if check():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"{what} never happened; the view shows:\n{shown(pilot.app)}")  # type: ignore[arg-type]


async def until_shown(pilot: Pilot[Any], text: str) -> None:
    await until(pilot, f"{text!r} shown", lambda: text in shown(pilot.app))  # type: ignore[arg-type]


async def type_text(pilot: Pilot[Any], text: str) -> None:
    await pilot.press(*[("space" if c == " " else c) for c in text])


def finished_jobs(perq: Perq, n: int) -> list[str]:
    ids = [
        perq.submit("hello", f"Say hello {i}", "--provider", "script", "--model", "script.toml")
        for i in range(n)
    ]
    perq.burst()
    return ids


# --- history, checkpoints, events ---------------------------------------------------------------------


async def test_history_checkpoints_events_and_detail(perq: Perq) -> None:
    setup(perq)
    older, newer = finished_jobs(perq, 2)
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(
            pilot, "the history", lambda: isinstance(app.screen, HistoryScreen) and bool(lines_of(app))
        )
        lines = lines_of(app)
        assert [newer in lines[0], older in lines[1]] == [True, True]
        assert lines[0].startswith("completed") and f"hello - 3 steps ({newer}) (" in lines[0]
        assert footer_keys(app) == {
            "↑↓": "Navigate",
            "⏎": "Continue",
            "c": "Checkpoints",
            "n": "New run",
            "r": "Refresh",
            "q": "Quit",
        }

        await pilot.press("down", "c")  # the older job's checkpoints
        assert isinstance(app.screen, CheckpointsScreen)
        checkpoints = perq.checkpoints(older)
        lines = lines_of(app)
        assert [line.split("  ")[0] for line in lines] == [
            f"Step {cp.step_number} ({cp.id})" for cp in reversed(checkpoints)
        ]
        assert all("  hello  " in line for line in lines)
        assert lines[0].endswith("completed")
        assert footer_keys(app) == {
            "↑↓": "Navigate",
            "⏎": "Resume from here",
            "e": "Events",
            "b/Esc": "Back",
            "q": "Quit",
        }

        await pilot.press("e")  # the events up to step 3
        assert isinstance(app.screen, EventsScreen)
        lines = lines_of(app)
        assert lines[0].startswith("[Step 1] startRun") and 'Query: "Say hello 0"' in lines[0]
        assert any(line.startswith("[Step 1] callTools") and "Tools: todo" in line for line in lines)
        assert lines[-1].startswith("[Step 3] completeRun") and "Result: Hello!" in lines[-1]
        assert footer_keys(app)["⏎"] == "Detail"

        await pilot.press("enter")  # the first event in full
        assert isinstance(app.screen, EventScreen)
        detail = json.loads(plain(app.screen.query_one("#json", Static).render()))
        assert detail["type"] == "startRun" and detail["jobId"] == older

        for view in (EventsScreen, CheckpointsScreen, HistoryScreen):
            await pilot.press("b")
            assert isinstance(app.screen, view)
        await pilot.press("q")
    assert app.return_code == 0


async def test_history_loads_a_page_at_a_time(perq: Perq) -> None:
    """A store of 250 jobs: the history reads 100 records, and more as the cursor nears the end."""
    store = perq.store
    start = now_ms() - 250_000
    for i in range(250):
        job = Job(
            id=f"job{i:03d}",
            status="completed",
            coordinator_expert_key="hello",
            total_steps=3,
            usage=Usage(),
            started_at=start + i * 1000,
        )
        store.save_job(job, new=True)
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: bool(lines_of(app)))
        assert len(lines_of(app)) == 100
        assert "job249" in lines_of(app)[0] and "job150" in lines_of(app)[-1]
        assert "250 jobs, newest first (100 loaded" in shown(app)
        await pilot.press("end")
        await until(pilot, "the second page", lambda: len(lines_of(app)) == 200)
        await pilot.press("end")
        await until(pilot, "the last page", lambda: len(lines_of(app)) == 250)
        assert "job000" in lines_of(app)[-1]
        assert "(100 loaded" not in shown(app)


async def test_damaged_records_are_named_not_fatal(perq: Perq) -> None:
    setup(perq)
    good, bad = finished_jobs(perq, 2)
    (perq.storage / "jobs" / bad / "job.json").write_text("{not json")
    cp = perq.checkpoints(good)[0]
    (perq.storage / "jobs" / good / "checkpoints" / f"{cp.id}.json").write_text("[]")
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: bool(lines_of(app)))
        assert len(lines_of(app)) == 1 and good in lines_of(app)[0]
        assert "skipped 1 damaged: damaged file" in shown(app) and bad in shown(app)
        assert "perq: 2 jobs, newest first\n" in shown(app)  # all read: nothing more to load
        await pilot.press("c")
        assert isinstance(app.screen, CheckpointsScreen)
        assert len(lines_of(app)) == 2
        assert "skipped 1 damaged: damaged file" in shown(app) and cp.id in shown(app)


# --- new runs, live runs --------------------------------------------------------------------------------


async def test_new_run_follows_live_events_to_completion(perq: Perq) -> None:
    setup(perq)
    perq.start_worker()
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: isinstance(app.screen, HistoryScreen))
        assert "No jobs yet: press n to start a run" in shown(app)
        await pilot.press("n")
        assert isinstance(app.screen, NewRunScreen)
        assert lines_of(app) == ["asker  Asks the user", "hello  Greets the user"]
        await pilot.press("down", "enter")
        assert isinstance(app.screen, QueryScreen)
        assert "New job of hello" in shown(app)
        await pilot.press("enter")  # nothing typed: refused in the view
        assert "Type the query first" in shown(app)
        await type_text(pilot, "Say hello live")
        await pilot.press("enter")
        await until(pilot, "the live view", lambda: isinstance(app.screen, LiveScreen))
        live = app.screen
        assert isinstance(live, LiveScreen)
        await until_shown(pilot, "completed: hello - 3 steps")
        text = shown(app)
        assert "[Step 1] startRun" in text and 'Query: "Say hello live"' in text
        assert "Tools: todo" in text and "✓ todo" in text
        assert "Result: Hello!" in text and "\nHello!\n" in text
        assert "Todos (hello): [x] say hello" in text
        job = perq.job(live.job.id)
        assert job.status == "completed" and job.total_steps == 3
        u = job.usage
        assert (
            f"completed  hello  step 3  tool calls 3  tokens in {u.input_tokens} out {u.output_tokens}"
            in text
        )
        assert "Follow-up query" in text
        assert footer_keys(app)["Ctrl+C"] == "Cancel job"

        await type_text(pilot, "once more")  # a follow-up continues the same job
        await pilot.press("enter")
        await until_shown(pilot, "Hello again!")
        await until_shown(pilot, "completed: hello - 4 steps")
        assert perq.job(job.id).total_steps == 4

        await pilot.press("escape")
        assert isinstance(app.screen, HistoryScreen)
        assert lines_of(app)[0].startswith("completed") and f"hello - 4 steps ({job.id})" in lines_of(app)[0]


async def test_continue_a_job_from_the_history(perq: Perq) -> None:
    setup(perq)
    (job_id,) = finished_jobs(perq, 1)
    perq.start_worker()
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: bool(lines_of(app)))
        await pilot.press("enter")
        assert isinstance(app.screen, QueryScreen)
        assert f"Continue hello - 3 steps ({job_id})" in shown(app)
        await type_text(pilot, "again")
        await pilot.press("enter")
        await until_shown(pilot, "completed: hello - 4 steps")
    assert perq.job(job_id).status == "completed"


INTERACTIVE_TURNS: list[dict[str, Any]] = [
    {"toolCalls": [{"toolName": "askUser", "args": {"question": "Which colour?"}}]},
    {"text": "thanks"},
]


async def test_interactive_stop_is_answered_in_the_live_view(perq: Perq) -> None:
    setup(perq, INTERACTIVE_TURNS)
    perq.start_worker()
    app = make_app(perq, expert_key="asker", query="start")  # perq start asker start: runs at once
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the live view", lambda: isinstance(app.screen, LiveScreen))
        await until_shown(pilot, 'The job waits for an answer to askUser {"question": "Which colour?"}')
        assert "Answer (Enter submits it as -i)" in shown(app)
        live = app.screen
        assert isinstance(live, LiveScreen)
        assert perq.job(live.job.id).status == "stoppedByInteractiveTool"
        await type_text(pilot, "Blue")
        await pilot.press("enter")
        await until_shown(pilot, "completed: asker - 3 steps")
        assert "— answer: Blue" in shown(app)
    job_id = live.job.id
    events = perq.events(job_id)
    finished = next(e for e in events if isinstance(e, FinishAllToolCalls))
    answered = finished.new_messages[0]
    assert isinstance(answered, ToolMessage)
    answer = answered.contents[0]
    assert answer.tool_name == "askUser"
    assert [p.text for p in answer.contents if isinstance(p, TextPart)] == ["Blue"]


async def test_a_waiting_job_asks_for_its_answer_from_the_history(perq: Perq) -> None:
    setup(perq, INTERACTIVE_TURNS)
    job_id = perq.submit("asker", "start", "--provider", "script", "--model", "script.toml")
    perq.burst()
    assert perq.job(job_id).status == "stoppedByInteractiveTool"
    perq.start_worker()
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: bool(lines_of(app)))
        assert lines_of(app)[0].startswith("stoppedByInteractiveTool asker - 1 steps")
        await pilot.press("enter")
        assert isinstance(app.screen, QueryScreen)
        assert f'Job {job_id} waits for an answer to askUser {{"question": "Which colour?"}}' in shown(app)
        await type_text(pilot, "Red")
        await pilot.press("enter")
        await until_shown(pilot, "completed: asker - 3 steps")
    assert perq.job(job_id).status == "completed"


async def test_resume_from_a_checkpoint_makes_a_branch(perq: Perq) -> None:
    setup(
        perq,
        [
            {"toolCalls": [{"toolName": "healthCheck", "args": {}}]},
            {"toolCalls": [{"toolName": "healthCheck", "args": {}}]},
            {"text": "first end"},
            {"text": "branch end"},
        ],
    )
    job_id = perq.submit("asker", "start", "--provider", "script", "--model", "script.toml")
    perq.burst()
    before = perq.checkpoints(job_id)
    assert [c.step_number for c in before] == [1, 2, 3]
    perq.start_worker()
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: bool(lines_of(app)))
        await pilot.press("c", "end", "enter")  # the oldest checkpoint: Step 1
        assert isinstance(app.screen, QueryScreen)
        assert f"Resume job {job_id} from Step 1 ({before[0].id})" in shown(app)
        await type_text(pilot, "branch")
        await pilot.press("enter")
        await until_shown(pilot, "completed: asker - 3 steps")
    job = perq.job(job_id)
    assert sorted(c.step_number for c in perq.checkpoints(job_id)) == [1, 2, 2, 3, 3]
    head = perq.store.load_checkpoint(job_id, job.head_checkpoint_id or "")
    assert head is not None and head.id not in {c.id for c in before}
    assert [m.contents[0].text for m in head.messages if m.type == "userMessage"] == ["start", "branch"]  # type: ignore[union-attr]


async def test_cancel_from_the_live_view_after_confirmation(perq: Perq) -> None:
    slow = [{"toolCalls": [{"toolName": "healthCheck", "args": {}}], "delayMs": 300}] * 50
    setup(perq, slow)
    perq.start_worker()
    app = make_app(perq, expert_key="asker", query="go")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the live view", lambda: isinstance(app.screen, LiveScreen))
        await until_shown(pilot, "[Step 2] callTools")
        live = app.screen
        assert isinstance(live, LiveScreen)
        await pilot.press("ctrl+c")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # not confirmed: the job runs on
        assert app.screen is live and perq.job(live.job.id).status == "running"
        await pilot.press("ctrl+c")
        await pilot.press("y")
        await until_shown(pilot, "cancelled: asker")
    job = perq.job(live.job.id)
    assert job.status == "cancelled" and job.total_steps < 50


# --- bad input -----------------------------------------------------------------------------------------


async def test_no_worker_alive_is_said(perq: Perq) -> None:
    setup(perq)
    app = make_app(perq, expert_key="hello", query="anyone?")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the live view", lambda: isinstance(app.screen, LiveScreen))
        await until_shown(pilot, f"No worker is alive on queue {perq.queue}")
        assert "queued" in shown(app)
        perq.start_worker()
        await until_shown(pilot, "completed: hello - 3 steps")
        assert "No worker is alive" not in shown(app)


async def test_unknown_expert_is_named_in_the_new_run_view(perq: Perq) -> None:
    setup(perq)
    app = make_app(perq, expert_key="nosuch", query="hi")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the new-run view", lambda: isinstance(app.screen, NewRunScreen))
        await until_shown(pilot, "expert 'nosuch' not found")
        assert "(experts: asker, hello)" in shown(app)
        assert lines_of(app) == ["asker  Asks the user", "hello  Greets the user"]
    assert perq.store.list_jobs().total == 0


async def test_expert_without_query_asks_for_it(perq: Perq) -> None:
    setup(perq)
    app = make_app(perq, expert_key="hello")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the query view", lambda: isinstance(app.screen, QueryScreen))
        assert "New job of hello" in shown(app)
        await pilot.press("escape")
        assert isinstance(app.screen, NewRunScreen)


async def test_unreachable_redis_is_said_and_leaves_no_job(perq: Perq) -> None:
    setup(perq)
    app = make_app(perq, redis_url="redis://127.0.0.1:1/0")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: isinstance(app.screen, HistoryScreen))
        await pilot.press("n", "enter")
        await type_text(pilot, "hi")
        await pilot.press("enter")
        await until_shown(pilot, "cannot reach Redis at redis://127.0.0.1:1/0")
        assert isinstance(app.screen, QueryScreen)
    assert perq.store.list_jobs().total == 0


async def test_refusals_show_before_the_query_is_asked(perq: Perq) -> None:
    """A job whose expert left perstack.toml cannot be continued: Enter says so, and nothing is written."""
    setup(perq)
    (job_id,) = finished_jobs(perq, 1)
    perq.write("perstack.toml", CONFIG.replace("[experts.hello]", "[experts.renamed]"))
    app = make_app(perq)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the history", lambda: bool(lines_of(app)))
        await pilot.press("enter")
        assert isinstance(app.screen, HistoryScreen)
        assert "expert 'hello' not found" in shown(app)
    assert len(perq.store.list_runs(job_id)) == 1


async def test_continue_job_option_asks_for_the_query(perq: Perq) -> None:
    """`perq start --continue-job JOB`: the query view for that job, over the history."""
    setup(perq)
    (job_id,) = finished_jobs(perq, 1)
    perq.start_worker()
    app = make_app(perq, continue_job=job_id)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, "the query view", lambda: isinstance(app.screen, QueryScreen))
        assert f"Continue hello - 3 steps ({job_id})" in shown(app)
        await type_text(pilot, "more")
        await pilot.press("enter")
        await until_shown(pilot, "completed: hello - 4 steps")
        await pilot.press("escape")
        assert isinstance(app.screen, HistoryScreen)


async def test_continue_job_option_names_an_unknown_job(perq: Perq) -> None:
    setup(perq)
    app = make_app(perq, continue_job="nosuchjob")
    async with app.run_test(size=SIZE) as pilot:
        await until_shown(pilot, "job nosuchjob not found")
        assert isinstance(app.screen, HistoryScreen)
