"""`perq log`: which events to show. Selection reads the store; the filters are pure functions.

Kept apart from the command (`producer/cli/log.py`) and its look (`producer/views/log.py`): `perq start`,
`perq export` and the follower read jobs and events through the same functions.

Filters apply in Perstack's order: --step, --type, --errors, --tools, --delegations, --filter; then
--offset and --take paginate the matches, and --context re-adds neighbouring events around each match.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field
from typing import Any

from shared.models import Checkpoint, Event, Job, check_id, now_ms
from shared.store import JobStore, StoreError

ERROR_TYPES = frozenset({"retry", "stopRunByError"})
TOOL_TYPES = frozenset({"callTools", "resolveToolResults", "callInteractiveTool"})
DELEGATION_TYPES = frozenset({"callDelegate", "stopRunByDelegate"})
DEFAULT_TAKE = 100


class LogError(ValueError):
    """A filter or selection perq cannot use; the message says which."""


class CheckpointNotFound(LogError):
    pass


# --- --step ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepFilter:
    op: str  # "==", ">", ">=", "<", "<=" or "range"
    value: int
    high: int = 0  # the upper bound of a range

    def matches(self, step: int | None) -> bool:
        if step is None:  # runtime events have no step: no step filter selects them
            return False
        if self.op == "range":
            return self.value <= step <= self.high
        return _ORDER[self.op](step, self.value)


_ORDER = {
    "==": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}
_STEP_RE = re.compile(r"^(>=|<=|>|<)?(\d+)$")
_RANGE_RE = re.compile(r"^(\d+)-(\d+)$")


def parse_step_filter(text: str) -> StepFilter:
    """`N`, `>N`, `>=N`, `<N`, `<=N` or `A-B` (inclusive)."""
    s = text.strip()
    if m := _RANGE_RE.match(s):
        if int(m[1]) > int(m[2]):
            raise LogError(f"Invalid step filter: {text} (a range runs from the lower step to the higher)")
        return StepFilter("range", int(m[1]), int(m[2]))
    if m := _STEP_RE.match(s):
        return StepFilter(m[1] or "==", int(m[2]))
    raise LogError(f"Invalid step filter: {text}")


# --- --filter '.path op value' -------------------------------------------------------------------

Scalar = str | float | bool
_WILDCARD = "[]"
_FILTER_RE = re.compile(r"^\.([A-Za-z_][\w.\[\]]*)\s*(==|!=|>=|<=|>|<)\s*(.+)$")
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_MISSING = object()


@dataclass(frozen=True)
class Condition:
    path: tuple[str, ...]  # keys, with "[]" for "every element of this array"
    op: str
    value: Scalar

    def matches(self, data: Any) -> bool:
        actual = _lookup(data, self.path)
        if actual is _MISSING:
            return False  # a field the event does not have never matches, not even with !=
        if isinstance(actual, list):
            return any(_compare(v, self.op, self.value) for v in actual)
        return _compare(actual, self.op, self.value)


def parse_condition(text: str) -> Condition:
    m = _FILTER_RE.match(text.strip())
    if not m:
        raise LogError(f"Invalid filter expression: {text} (use '.path op value', e.g. '.stepNumber > 3')")
    raw = m[3].strip()
    return Condition(_parse_path(m[1]), m[2], _parse_value(raw))


def _parse_path(path: str) -> tuple[str, ...]:
    parts: list[str] = []
    for chunk in re.split(r"(\[\])", path):
        if chunk == _WILDCARD:
            parts.append(_WILDCARD)
        elif "[" in chunk or "]" in chunk:  # only the whole-array wildcard `[]` is a bracket here
            raise LogError(f"Invalid filter path: .{path} (use `[]` for every element of an array)")
        else:
            parts.extend(p for p in chunk.split(".") if p)
    return tuple(parts)


def _parse_value(raw: str) -> Scalar:
    if raw in ("true", "false"):
        return raw == "true"
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    if _NUMBER_RE.match(raw):
        return float(raw)
    return raw  # an unquoted word compares as a string


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for i, key in enumerate(path):
        if data is None:
            return _MISSING
        if key == _WILDCARD:
            if not isinstance(data, list):
                return _MISSING
            rest = path[i + 1 :]
            if not rest:
                return data
            values: list[Any] = []
            for item in data:
                found = _lookup(item, rest)
                if isinstance(found, list):
                    values.extend(found)  # nested wildcards match any element at any depth (Perstack: none)
                elif found is not _MISSING:
                    values.append(found)
            return values
        if isinstance(data, dict):
            data = data.get(key, _MISSING)
        elif isinstance(data, list) and key.isdigit():
            data = data[int(key)] if int(key) < len(data) else _MISSING
        else:
            return _MISSING
        if data is _MISSING:
            return _MISSING
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _compare(actual: Any, op: str, expected: Scalar) -> bool:
    """JavaScript's strict comparisons, as Perstack makes them: no coercion between types."""
    if op in ("==", "!="):
        same_kind = (
            (_is_number(actual) and _is_number(expected))
            or (isinstance(actual, bool) and isinstance(expected, bool))
            or (isinstance(actual, str) and isinstance(expected, str))
        )
        equal = same_kind and actual == expected
        return equal if op == "==" else not equal
    if _is_number(actual) and _is_number(expected) and not math.isnan(actual):
        return bool(_ORDER[op](actual, expected))
    return False


# --- applying the filters ------------------------------------------------------------------------


@dataclass
class LogFilters:
    step: StepFilter | None = None
    type: str | None = None
    errors: bool = False
    tools: bool = False
    delegations: bool = False
    condition: Condition | None = None
    take: int = DEFAULT_TAKE  # 0 = all
    offset: int = 0
    context: int = 0

    def __post_init__(self) -> None:
        for name in ("take", "offset", "context"):
            if getattr(self, name) < 0:
                raise LogError(f"--{name} must be 0 or more")

    def matches(self, event: Event) -> bool:
        """Whether one event passes every filter (pagination and context aside)."""
        if self.step is not None and not self.step.matches(event.step_number):
            return False
        if self.type is not None and event.type != self.type:
            return False
        if self.errors and event.type not in ERROR_TYPES:
            return False
        if self.tools and event.type not in TOOL_TYPES:
            return False
        if self.delegations and event.type not in DELEGATION_TYPES:
            return False
        return self.condition is None or self.condition.matches(event.to_dict())


@dataclass
class Filtered:
    events: list[Event]
    total_before_pagination: int  # matches before --offset/--take
    matched_after_pagination: int  # matches shown, context events not counted


def apply_filters(events: list[Event], filters: LogFilters) -> Filtered:
    matched = [i for i, e in enumerate(events) if filters.matches(e)]
    total = len(matched)
    matched = matched[filters.offset :]
    if filters.take > 0:
        matched = matched[: filters.take]
    shown = set(matched)
    for i in matched:  # context after pagination, so that the page's own matches stay as they are
        shown.update(range(max(0, i - filters.context), min(len(events), i + filters.context + 1)))
    return Filtered([events[i] for i in sorted(shown)], total, len(matched))


def summarize(events: list[Event]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "totalEvents": len(events),
        "errorCount": sum(e.type in ERROR_TYPES for e in events),
        "toolCallCount": sum(e.type in TOOL_TYPES for e in events),
        "delegationCount": sum(e.type in DELEGATION_TYPES for e in events),
    }
    steps = [e.step_number for e in events if e.step_number is not None]
    if steps:
        summary["stepRange"] = {"min": min(steps), "max": max(steps)}
    return summary


# --- selection ------------------------------------------------------------------------------------


@dataclass
class LogSelection:
    job: str | None = None
    run: str | None = None
    checkpoint: str | None = None


@dataclass
class LogOutput:
    job: Job
    events: list[Event]
    summary: dict[str, Any]
    storage_path: str
    total_before_pagination: int
    matched_after_pagination: int
    checkpoint: Checkpoint | None = None
    checkpoints: list[Checkpoint] | None = None
    is_latest_job: bool = False
    problems: list[str] = field(default_factory=list)  # damaged files that were skipped

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job": self.job.to_dict(),
            "events": [e.to_dict() for e in self.events],
            "summary": self.summary,
        }
        if self.checkpoint is not None:
            data["checkpoint"] = self.checkpoint.to_dict()
        if self.checkpoints:
            data["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        if self.is_latest_job:
            data["isLatestJob"] = True
        data["storagePath"] = self.storage_path
        data["totalEventsBeforeLimit"] = self.total_before_pagination
        data["matchedAfterPagination"] = self.matched_after_pagination
        return data


def select(store: JobStore, selection: LogSelection, filters: LogFilters) -> LogOutput | None:
    """The job, events and checkpoints `perq log` shows, or None when there is nothing ("No data found").

    First match wins: --checkpoint, then --run, then --job, then the latest job.
    """
    problems: list[str] = []
    if selection.job is not None:
        job = find_job(store, check_id(selection.job, "job id"))
    else:
        job = latest_job(store)
    if job is None:
        return None
    checkpoint = None
    checkpoints = None
    if selection.checkpoint is not None:
        cp_id = check_id(selection.checkpoint, "checkpoint id")
        checkpoint = store.load_checkpoint(job.id, cp_id)
        if checkpoint is None:
            raise CheckpointNotFound(f"checkpoint not found: {cp_id}")
        events = run_events(store, job.id, checkpoint.run_id, problems)
    elif selection.run is not None:
        run_id = check_id(selection.run, "run id")
        if run_id not in run_ids(store, job.id):
            return None  # an unknown run has no data, as in Perstack
        events = run_events(store, job.id, run_id, problems)
    else:
        events = job_events(store, job.id, problems)
        if selection.job is not None:
            checkpoints, skipped = store.list_checkpoints(job.id)
            problems.extend(skipped)
    filtered = apply_filters(events, filters)
    return LogOutput(
        job=job,
        events=filtered.events,
        summary=summarize(filtered.events),
        storage_path=store.backend.describe(""),
        total_before_pagination=filtered.total_before_pagination,
        matched_after_pagination=filtered.matched_after_pagination,
        checkpoint=checkpoint,
        checkpoints=checkpoints,
        is_latest_job=selection.job is None,
        problems=problems,
    )


def find_job(store: JobStore, job_id: str) -> Job | None:
    """The job record, or one made up from its checkpoints when a store has none (Perstack writes none)."""
    try:
        job = store.load_job(job_id)
    except StoreError:
        job = None
    return job if job is not None else _synthesized_job(store, job_id)


def latest_job(store: JobStore) -> Job | None:
    job = store.latest_job()
    if job is not None:
        return job
    found = [j for j in (_synthesized_job(store, i) for i in store.backend.list("jobs")) if j is not None]
    return max(found, key=lambda j: j.started_at, default=None)


def _synthesized_job(store: JobStore, job_id: str) -> Job | None:
    try:
        checkpoints, _ = store.list_checkpoints(job_id, messages=False)
    except ValueError:
        return None
    if not checkpoints:
        return None
    first, last = checkpoints[0], checkpoints[-1]
    started = []
    for run_id in store.list_runs(job_id):
        try:
            setting = store.load_run_setting(job_id, run_id)
        except (StoreError, ValueError):
            setting = None
        if setting is not None:
            started.append(setting.started_at)
    return Job(
        id=job_id,
        status="completed" if last.status == "completed" else "running",
        coordinator_expert_key=first.expert.key,
        total_steps=last.step_number,
        usage=last.usage,
        started_at=min(started, default=0) or now_ms(),
    )


def run_ids(store: JobStore, job_id: str) -> list[str]:
    """The job's runs: its run folders, else the distinct runs its checkpoints name."""
    runs = store.list_runs(job_id)
    if runs:
        return runs
    checkpoints, _ = store.list_checkpoints(job_id, messages=False)
    return list(dict.fromkeys(c.run_id for c in checkpoints))


def run_events(store: JobStore, job_id: str, run_id: str, problems: list[str]) -> list[Event]:
    events, damaged = store.read_events(job_id, run_id)
    problems.extend(damaged)
    return events


def job_events(store: JobStore, job_id: str, problems: list[str]) -> list[Event]:
    """Every run's events merged by time; each run keeps its own order even where clocks disagree."""
    per_run = [run_events(store, job_id, run_id, problems) for run_id in run_ids(store, job_id)]
    return list(heapq.merge(*per_run, key=lambda e: e.timestamp))
