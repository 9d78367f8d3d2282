"""Perstack's own store layout, where it differs from perq's: how to read it, and the names it gives files.

Perstack's runtime writes each event of a run to its own file,

    jobs/{jobId}/runs/{runId}/event-{timestamp}-{step}-{type}.json

and its job record names no head checkpoint. perq writes neither (a run's events are one log, and
the job record tracks the coordinator's head), but reads both, so that a store Perstack wrote lists, logs
and continues; `perq export` names its event files with `event_file_name`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import get_args

from pydantic import ValidationError

from shared.models import (
    Checkpoint,
    Event,
    Job,
    ReasoningStreamEventType,
    RunResultStreamEventType,
    StepEndingEventType,
    read_event,
)

_EVENT_FILE = re.compile(r"^event-(\d+)-(\d+)-([A-Za-z]+)\.json$")

# The order in which a step's events happen, by type. Perstack's file names carry only the millisecond, so
# two events of a step written in the same one are put back in the order the state machine emits them.
_STEP_ORDER = {
    t: i
    for i, t in enumerate(
        [
            "startRun",
            "resumeToolCalls",
            "finishAllToolCalls",
            "startGeneration",
            *get_args(ReasoningStreamEventType),
            "callTools",
            "resolveToolResults",
            "callDelegate",
            "callInteractiveTool",
            "attemptCompletion",
            *get_args(RunResultStreamEventType),
            "finishToolCall",
            "retry",  # a retry ends the generation it follows, and with it the step
            *get_args(StepEndingEventType),
        ]
    )
}

# the events Perstack's runtime stores (its run events); runtime events (skills) and perq's own are not
RUN_EVENT_TYPES = frozenset(_STEP_ORDER)


def event_file_name(timestamp: int, step_number: int, type_: str) -> str:
    return f"event-{timestamp}-{step_number}-{type_}.json"


def event_files(names: list[str]) -> list[str]:
    """The event files among a run folder's names, in the order their events happened."""
    found: list[tuple[int, int, int, str]] = []
    for name in names:
        if m := _EVENT_FILE.match(name):
            found.append((int(m[1]), int(m[2]), _STEP_ORDER.get(m[3], len(_STEP_ORDER)), name))
    return [name for *_, name in sorted(found)]


def read_event_files(
    names: list[str], read: Callable[[str], bytes | None], describe: Callable[[str], str]
) -> tuple[list[Event], list[str]]:
    """The events of a run stored one per file (named among `names`, read with `read`), in order, and the
    names of damaged files that were skipped."""
    events: list[Event] = []
    problems: list[str] = []
    for name in event_files(names):
        data = read(name)
        if data is None:
            continue
        try:
            events.append(read_event(data))
        except ValidationError:
            problems.append(f"damaged event file {describe(name)}")
    return events, problems


def lacks_head(job: Job) -> bool:
    """Whether the record was written by Perstack: perq's records carry the submission's epoch, and the
    head checkpoint once a step of the coordinator has ended."""
    return job.head_checkpoint_id is None and job.epoch is None


def head_checkpoint_id(job: Job, checkpoints: list[Checkpoint]) -> str | None:
    """The checkpoint a continuation resumes: the one the record names, else for a record Perstack wrote the
    coordinator's latest (by step number) among the job's `checkpoints`. A delegate's checkpoint is never the
    head, even when it is the job's latest."""
    if not lacks_head(job):
        return job.head_checkpoint_id
    own = [c for c in checkpoints if c.delegated_by is None and c.expert.key == job.coordinator_expert_key]
    return max(own, key=lambda c: c.step_number).id if own else None
