"""The `perq start` app (Textual): history, checkpoints, events, new run, live run, and how they connect.

Views read the store through `producer.tui.source`; the only writes are submissions through
`producer.api.Client.submit` (the path of `perq run`) and cancellations through `Client.cancel` (the path
of `perq cancel`). A request is checked with `plan_submission` (which writes nothing) before the view asks
for its query, so that a refusal shows at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Generic, TypeVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, OptionList, RichLog, Static
from textual.widgets.option_list import Option

from producer.api import Client, QueueUnavailable, RunRequest, plan_submission
from producer.follow import Progress
from producer.tui import live, source
from producer.views.status import STATUS_STYLE, checkpoint_line
from shared.config import ConfigError, Settings
from shared.models import Checkpoint, Event, Job, now_ms
from shared.store import StoreError

WORKER_CHECK_S = 2.0
BACK = Binding("b,escape", "back", "Back", key_display="b/Esc")
QUIT = Binding("q", "app.quit", "Quit")
Item = TypeVar("Item")


class Picker(OptionList):
    """A list that shows ↑↓ in the footer. Each view's list names what Enter does there.

    Enter stays the list's own key (it posts OptionSelected), never a priority binding of the view: a
    priority binding would run before the list has moved its cursor for the keys typed just before it.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "Navigate", key_display="↑↓"),
        Binding("down", "cursor_down", "Navigate", show=False),
    ]


class JobList(Picker):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Continue")]


class CheckpointList(Picker):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Resume from here")]


class EventList(Picker):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Detail")]


class ExpertList(Picker):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Select")]


class Notice(Static):
    """A view's one-line message: what went wrong, or what to do next."""

    def say(self, text: str, *, error: bool = False) -> None:
        self.update(Text(text, style="bold red" if error else "yellow"))

    def clear(self) -> None:
        self.update("")


def _title(text: str) -> Static:
    return Static(Text(text, style="bold"), classes="title")


def _refusal(e: Exception) -> str:
    return str(e) or type(e).__name__


# --- history ------------------------------------------------------------------------------------------


class PerqScreen(Screen[None]):
    """A view of `perq start`: its app typed as perq's, and Back (where a view binds it) returning to the
    view it was opened from."""

    @property
    def perq(self) -> StartApp:
        return self.app  # type: ignore[return-value]

    def action_back(self) -> None:
        self.app.pop_screen()


class PickerScreen(PerqScreen, Generic[Item]):
    """A view choosing among `items`, one line each in its list (under its heading and a notice): Enter (or a
    click) chooses the highlighted one with `action_choose`."""

    PICKER: ClassVar[type[Picker]]  # the view's list, whose footer names what Enter does

    def __init__(self) -> None:
        super().__init__()
        self.items: list[Item] = []

    def heading(self) -> str:
        raise NotImplementedError

    def compose(self) -> ComposeResult:
        yield _title(self.heading())
        yield Notice(id="message")
        yield self.PICKER()
        yield Footer()

    def _highlighted(self) -> Item | None:
        index = self.query_one(Picker).highlighted
        return self.items[index] if index is not None and index < len(self.items) else None

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.action_choose()

    def action_choose(self) -> None:
        raise NotImplementedError

    def _say_read(self, problems: list[str], none: str) -> None:
        """Say what reading the items from the store skipped as damaged, else `none` when there are none."""
        message = self.query_one(Notice)
        if problems:
            message.say(f"skipped {len(problems)} damaged: {problems[0]}", error=True)
        elif not self.items:
            message.say(none)
        else:
            message.clear()


class HistoryScreen(PickerScreen[Job]):
    """Jobs, newest first, read a page at a time from the store's index."""

    PICKER = JobList
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "checkpoints", "Checkpoints"),
        Binding("n", "new_run", "New run"),
        Binding("r", "refresh", "Refresh"),
        QUIT,
    ]

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.loaded = 0  # how many jobs the list asks the store for (a multiple of the page)
        self.more = False  # whether the store holds jobs beyond those read

    def heading(self) -> str:
        return "perq: jobs, newest first"

    def on_screen_resume(self) -> None:
        """Shown first, or again after another view: read the jobs anew (their statuses move on)."""
        self.load(max(self.loaded, source.PAGE))
        self.perq.route_options(self.query_one(Notice))

    def load(self, limit: int) -> None:
        found = source.history(self.perq.client.store, limit)
        picker = self.query_one(Picker)
        keep = picker.highlighted
        self.items, self.total, self.loaded = found.jobs, found.total, limit
        picker.set_options(Option(source.job_label(job), id=job.id) for job in self.items)
        if self.items:
            picker.highlighted = min(keep or 0, len(self.items) - 1)
        # more to read only when this page came back full: damaged records count in the total, not the list
        self.more = len(self.items) >= limit and len(self.items) < self.total
        title = f"perq: {self.total} jobs, newest first"
        if self.more:
            title += f" ({len(self.items)} loaded; more load as you scroll)"
        self.query_one(".title", Static).update(Text(title, style="bold"))
        self._say_read(found.problems, "No jobs yet: press n to start a run")

    @on(OptionList.OptionHighlighted)
    def _near_the_end(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_index >= len(self.items) - 5 and self.more:
            self.load(self.loaded + source.PAGE)

    def action_refresh(self) -> None:
        self.load(max(self.loaded, source.PAGE))

    def action_choose(self) -> None:
        """Continue the job: follow it while it runs, else ask for a query (or the answer it waits for)."""
        job = self._highlighted()
        if job is None:
            return
        current, problem = source.load_job(self.perq.client.store, job.id)
        if current is None:
            self.query_one(Notice).say(problem or f"job {job.id} not found", error=True)
            return
        if current.status in ("queued", "running"):
            self.app.push_screen(LiveScreen(current))
            return
        self.perq.ask_to_continue(current, self.query_one(Notice))

    def action_checkpoints(self) -> None:
        job = self._highlighted()
        if job is not None:
            self.app.push_screen(CheckpointsScreen(job))

    def action_new_run(self) -> None:
        self.app.push_screen(NewRunScreen())


# --- checkpoints, events, one event ---------------------------------------------------------------------


class CheckpointsScreen(PickerScreen[Checkpoint]):
    """A job's checkpoints, newest first; Enter branches from one, `e` shows how its run got there."""

    PICKER = CheckpointList
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "events", "Events"),
        BACK,
        QUIT,
    ]

    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job

    def heading(self) -> str:
        return f"Checkpoints of {source.job_line(self.job)}, newest first"

    def on_mount(self) -> None:
        found = source.checkpoints(self.perq.client.store, self.job.id)
        self.items = found.checkpoints
        self.query_one(Picker).set_options(
            Option(source.checkpoint_label(cp), id=cp.id) for cp in self.items
        ).highlighted = 0
        self._say_read(found.problems, "This job has no checkpoints yet")

    def action_choose(self) -> None:
        cp = self._highlighted()
        if cp is None:
            return
        request = self.perq.base_request().replaced(
            expert_key=self.job.coordinator_expert_key,
            continue_job=self.job.id,
            resume_from=cp.id,
        )
        self.perq.ask_for_query(
            request,
            f"Resume job {self.job.id} from {checkpoint_line(cp)}: a new branch from this checkpoint",
            self.query_one(Notice),
        )

    def action_events(self) -> None:
        cp = self._highlighted()
        if cp is not None:
            self.app.push_screen(EventsScreen(cp))


class EventsScreen(PickerScreen[Event]):
    """The events of a checkpoint's run up to its step, one line each; Enter shows one in full."""

    PICKER = EventList
    BINDINGS: ClassVar[list[BindingType]] = [BACK, QUIT]

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def heading(self) -> str:
        cp = self.checkpoint
        return f"Events up to {checkpoint_line(cp)} ({cp.expert.key}, run {cp.run_id})"

    def on_mount(self) -> None:
        found = source.checkpoint_events(self.perq.client.store, self.checkpoint)
        self.items = found.events
        self.query_one(Picker).set_options(Option(source.event_label(e)) for e in self.items).highlighted = 0
        self._say_read(found.problems, "No events recorded for this checkpoint's run")

    def action_choose(self) -> None:
        event = self._highlighted()
        if event is not None:
            self.app.push_screen(EventScreen(event))


class EventScreen(PerqScreen):
    """One event as pretty JSON, scrollable."""

    BINDINGS: ClassVar[list[BindingType]] = [BACK, QUIT]

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event

    def compose(self) -> ComposeResult:
        yield _title(f"{self.event.type} (step {self.event.step_number}, {self.event.expert_key})")
        with VerticalScroll(id="detail"):
            yield Static(Text(source.event_json(self.event)), id="json")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#detail").focus()


# --- new runs and queries ---------------------------------------------------------------------------------


class NewRunScreen(PickerScreen[str]):
    """The experts of perstack.toml; Enter asks for the query of a new job."""

    PICKER = ExpertList
    BINDINGS: ClassVar[list[BindingType]] = [BACK, QUIT]

    def __init__(self, expert_key: str | None = None, problem: str | None = None) -> None:
        super().__init__()
        self.preselect = expert_key
        self.problem = problem

    def heading(self) -> str:
        return "New run: choose an expert"

    def on_mount(self) -> None:
        request = self.perq.base_request()
        found = source.experts(request.config, request.cwd)
        message = self.query_one(Notice)
        if found.problem:
            message.say(found.problem, error=True)
            return
        self.items = sorted(found.experts)
        picker = self.query_one(Picker)
        picker.set_options(
            Option(source.expert_label(found.experts[k]), id=k) for k in self.items
        ).highlighted = 0
        title = f"New run: choose an expert of {found.config_path}"
        self.query_one(".title", Static).update(Text(title, style="bold"))
        if self.problem:
            message.say(self.problem, error=True)
        elif not self.items:
            message.say(f"{found.config_path} has no experts", error=True)
        if self.preselect in self.items:
            picker.highlighted = self.items.index(self.preselect)
            if not self.problem:
                self.action_choose()

    def action_choose(self) -> None:
        key = self._highlighted()
        if key is None:
            return
        request = self.perq.base_request().replaced(expert_key=key)
        self.perq.ask_for_query(request, f"New job of {request.expert_key}", self.query_one(Notice))


class QueryInput(Input):
    """An input whose Enter shows in the footer."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "submit", "Submit")]


class QueryScreen(PerqScreen):
    """Asks for a query (or an answer), then submits the request as `perq run` does and follows the job."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "Back", key_display="Esc")]

    def __init__(self, request: RunRequest, heading: str, prompt: str) -> None:
        super().__init__()
        self.request = request
        self.heading = heading
        self.prompt = prompt

    def compose(self) -> ComposeResult:
        yield _title(self.heading)
        yield Notice(id="message")
        yield QueryInput(placeholder=self.prompt, id="query")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            self.query_one(Notice).say(f"Type the {self.prompt.split(' ')[0].lower()} first", error=True)
            return
        self.query_one(Input).disabled = True
        self.submit(self.request.replaced(query=text))

    @work(exclusive=True, group="submit")
    async def submit(self, request: RunRequest) -> None:
        result = await self.perq.submit(request)
        if isinstance(result, str):
            self.query_one(Notice).say(result, error=True)
            query = self.query_one(Input)
            query.disabled = False
            query.focus()
            return
        self.app.switch_screen(LiveScreen(*result))


# --- live run ----------------------------------------------------------------------------------------------


class LiveScreen(PerqScreen):
    """A job's events as they happen, its progress and todo list; when it stops, the answer or follow-up."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+c", "cancel_job", "Cancel job", key_display="Ctrl+C", priority=True),
        Binding("b,escape", "back", "Back to history", key_display="b/Esc"),
        QUIT,
    ]

    def __init__(self, job: Job, start: str | None = None, submitted_at: int | None = None) -> None:
        super().__init__()
        self.job = job
        self.start = start  # None: a job already running, whose current segment is looked up
        self.submitted_at = submitted_at if submitted_at is not None else (job.epoch or 0)
        self.progress = Progress()
        self.status: str | None = None  # the final status once the job stops
        self.answering = False  # the input answers an interactive tool call (-i)
        self.alive_workers: int | None = None

    def compose(self) -> ComposeResult:
        yield _title(f"Job {self.job.id} ({self.job.coordinator_expert_key})")
        yield Static(id="progress")
        yield Notice(id="message")
        yield Static(id="todos")
        yield RichLog(id="log", wrap=True, markup=False, highlight=False)
        yield Static(id="prompt")
        yield QueryInput(id="reply")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#reply", Input).display = False
        self._show_progress("queued" if self.job.status == "queued" else "running")
        self.follow_job()
        self.set_interval(WORKER_CHECK_S, self.check_workers)
        self.run_worker(self.check_workers(), group="workers")

    def _show_progress(self, status: str) -> None:
        style = STATUS_STYLE.get(status, "")
        self.query_one("#progress", Static).update(Text.assemble((status, style), "  ", self.progress.line()))

    def show_event(self, event: Event, progress: Progress) -> None:
        log = self.query_one(RichLog)
        for line in live.event_text(event):
            log.write(line)
        todos = live.todos_of(event)
        if todos is not None:
            self.query_one("#todos", Static).update(live.todo_text(event.expert_key or "", todos))
        self._show_progress(progress.status or "running")

    @work(exclusive=True, group="follow")
    async def follow_job(self) -> None:
        self.status = None
        message = self.query_one(Notice)
        try:
            client = self.perq.client
            start = self.start
            if start is None:
                start = await live.position_of_running(client, self.job)
            status = await live.follow(
                client,
                self.job.id,
                self.show_event,
                start=start,
                cancelled_since=self.submitted_at,
                progress=self.progress,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Redis gone, a damaged record: say so, never a traceback
            message.say(f"stopped following job {self.job.id}: {_refusal(e)}", error=True)
            return
        self.status = status
        self._stopped(status)

    def _stopped(self, status: str) -> None:
        self._show_progress(status)
        job, _ = source.load_job(self.perq.client.store, self.job.id)
        if job is not None:
            self.job = job
        self.query_one(RichLog).write(
            Text.assemble((status, STATUS_STYLE.get(status, "")), ": ", source.job_line(self.job))
        )
        call = source.waiting_call(self.perq.client.store, self.job) if job is not None else None
        prompt = self.query_one("#prompt", Static)
        reply = self.query_one("#reply", Input)
        self.answering = status == "stoppedByInteractiveTool"
        if self.answering:
            asked = source.question(call) if call else "the waiting tool call"
            prompt.update(Text(f"The job waits for an answer to {asked}", style="bold yellow"))
            reply.placeholder = "Answer (Enter submits it as -i)"
        else:
            prompt.update(Text("Follow-up query to continue this job (Esc: back to history)", style="dim"))
            reply.placeholder = "Follow-up query"
        reply.value = ""
        reply.disabled = False
        reply.display = True
        reply.focus()
        self.query_one(Notice).clear()
        # the reply's row, shown above, shrinks the log after its last line was written and scrolled to:
        # scroll again once the new layout is drawn, or that line (the job's outcome) hides below the fold
        log = self.query_one(RichLog)
        self.call_after_refresh(log.scroll_end, animate=False)

    async def check_workers(self) -> None:
        if self.status is not None:
            return
        try:
            alive = await live.workers_alive(self.perq.client)
        except Exception:  # the follower reports a lost Redis itself
            return
        message = self.query_one(Notice)
        if alive == 0:
            message.say(
                f"No worker is alive on queue {self.perq.client.settings.redis.queue}: the job waits "
                "until one starts (perq worker)",
                error=True,
            )
        elif self.alive_workers == 0:
            message.clear()
        self.alive_workers = alive

    @on(Input.Submitted, "#reply")
    def _replied(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.status is None:
            return
        request = self.perq.base_request().replaced(
            expert_key=self.job.coordinator_expert_key,
            query=text,
            continue_job=self.job.id,
            interactive=self.answering,
        )
        self.query_one("#reply", Input).disabled = True
        self.submit(request)

    @work(exclusive=True, group="submit")
    async def submit(self, request: RunRequest) -> None:
        result = await self.perq.submit(request)
        reply = self.query_one("#reply", Input)
        if isinstance(result, str):
            self.query_one(Notice).say(result, error=True)
            reply.disabled = False
            reply.focus()
            return
        self.job, self.start, self.submitted_at = result
        self.progress = Progress()
        reply.display = False
        self.query_one("#prompt", Static).update("")
        log = self.query_one(RichLog)
        log.write(Text(f"— {'answer' if request.interactive else 'query'}: {request.query}", style="bold"))
        self.status = None
        self._show_progress(self.job.status)
        self.follow_job()

    def action_cancel_job(self) -> None:
        if self.status is not None:
            self.query_one(Notice).say(f"job {self.job.id} is {self.status}: nothing to cancel")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.cancel()

        question = f"Cancel job {self.job.id}? It stops before its next step."
        self.app.push_screen(ConfirmScreen(question), confirmed)

    @work(exclusive=True, group="cancel")
    async def cancel(self) -> None:
        message = self.query_one(Notice)
        try:
            job = await self.perq.client.cancel(self.job.id)
        except (ConfigError, ValueError, StoreError, QueueUnavailable) as e:
            message.say(_refusal(e), error=True)
            return
        message.say(f"job {job.id} cancelled; waiting for its step in flight to finish")

    def action_back(self) -> None:
        self.perq.back_to_history()


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question over the current view."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No", key_display="n/Esc"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Static(Text(f"{self.question} (y/n)", style="bold"), id="question")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


# --- the app ---------------------------------------------------------------------------------------------

# what `perq start`'s command line says of its first submission only; later ones from the app start afresh
FIRST_SUBMISSION_ONLY: dict[str, Any] = {
    "expert_key": "",
    "query": "",
    "job_id": None,
    "continue_latest": False,
    "continue_job": None,
    "resume_from": None,
    "interactive": False,
}


class StartApp(App[None]):
    """`perq start`: browse the store, start runs and follow them; `request` holds `perq run`'s options."""

    TITLE = "perq"
    ENABLE_COMMAND_PALETTE = False  # the footer shows the keys of the current view, and only those
    CSS = """
    .title { padding: 0 1; background: $boost; }
    Notice { padding: 0 1; height: auto; }
    #progress, #todos, #prompt { padding: 0 1; height: auto; }
    Picker { height: 1fr; border: none; }
    RichLog { height: 1fr; }
    #detail { height: 1fr; }
    ConfirmScreen { align: center middle; }
    #question { width: 70; padding: 1 2; border: round $warning; background: $surface; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", show=False, priority=True)]

    def __init__(self, request: RunRequest, settings: Settings | None = None) -> None:
        super().__init__()
        self.request = request
        self.client = Client(settings)
        self.routed = False

    def base_request(self) -> RunRequest:
        """`perq start`'s options without the ones that only shaped its first submission."""
        return self.request.replaced(**FIRST_SUBMISSION_ONLY)

    def on_mount(self) -> None:
        self.push_screen(HistoryScreen())

    def route_options(self, message: Notice) -> None:
        """Once, over the history: what `perq start`'s arguments ask for (a run, a query, or nothing)."""
        if self.routed:
            return
        self.routed = True
        r = self.request
        continuing = r.continue_job is not None or r.continue_latest
        if r.expert_key and r.query:
            self.submit_first(r)
        elif continuing:
            self._continue_from_options(r, message)
        elif r.expert_key:
            self.push_screen(NewRunScreen(r.expert_key, self._refusal_of(r)))

    def _refusal_of(self, request: RunRequest) -> str | None:
        """Why a request would be refused (nothing is written to find out), or None."""
        try:
            plan_submission(request.replaced(query=request.query or "?"), self.client.store)
        except (ConfigError, ValueError, StoreError, OSError) as e:
            return _refusal(e)
        return None

    def _continue_from_options(self, r: RunRequest, message: Notice) -> None:
        """`--continue`/`--continue-job` (maybe `--resume-from`, `-i`) without a query: ask for it."""
        store = self.client.store
        if r.continue_job:
            job, problem = source.load_job(store, r.continue_job)
        else:
            job = store.latest_job()
            problem = None if job else "no job to continue: the store has no jobs"
        if job is None:
            message.say(problem or "no job to continue", error=True)
            return
        request = r.replaced(
            expert_key=r.expert_key or job.coordinator_expert_key, continue_job=job.id, continue_latest=False
        )
        if job.status in ("queued", "running"):
            self.push_screen(LiveScreen(job))
            return
        if r.resume_from:
            self.ask_for_query(request, f"Resume job {job.id} from {r.resume_from}", message)
        else:
            self.ask_to_continue(job, message, request)

    @work(group="submit")
    async def submit_first(self, request: RunRequest) -> None:
        """`perq start EXPERT QUERY`: submit at once; a refusal shows in the new-run view."""
        result = await self.submit(request)
        if isinstance(result, str):
            self.push_screen(NewRunScreen(request.expert_key, result))
            return
        self.push_screen(LiveScreen(*result))

    def ask_to_continue(self, job: Job, message: Notice, request: RunRequest | None = None) -> None:
        """Ask for a follow-up query, or for the answer to the tool call the job waits on."""
        request = request or self.base_request().replaced(
            expert_key=job.coordinator_expert_key, continue_job=job.id
        )
        call = source.waiting_call(self.client.store, job)
        if call is not None:
            request = request.replaced(interactive=True)
            self.ask_for_query(
                request,
                f"Job {job.id} waits for an answer to {source.question(call)}",
                message,
                prompt="Answer (submitted as -i)",
            )
            return
        self.ask_for_query(request, f"Continue {source.job_line(job)}", message)

    def ask_for_query(
        self, request: RunRequest, heading: str, message: Notice, *, prompt: str = "Query"
    ) -> None:
        """Open the query view, unless the request would be refused: then say why where the user is."""
        refusal = self._refusal_of(request)
        if refusal:
            message.say(refusal, error=True)
            return
        self.push_screen(QueryScreen(request, heading, prompt))

    async def submit(self, request: RunRequest) -> tuple[Job, str, int] | str:
        """Submit as `perq run` does: the job, where its stream stood before, and when; or why not."""
        try:
            submitted_at = now_ms()
            start = await live.position_before(self.client, request)
            job = await self.client.submit(request)
        except (ConfigError, ValueError, StoreError, QueueUnavailable, OSError) as e:
            return _refusal(e)
        return job, start, submitted_at

    def back_to_history(self) -> None:
        while len(self.screen_stack) > 2 and not isinstance(self.screen, HistoryScreen):
            self.pop_screen()

    async def on_unmount(self) -> None:
        await self.client.close()


def run_app(request: RunRequest, settings: Settings | None = None) -> int:
    StartApp(request, settings).run()
    return 0
