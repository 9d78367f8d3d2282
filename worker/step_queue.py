"""What a step needs of the queue, and an in-process queue for driving the loop without Redis.

A step asks the queue two things: at its start, whether its job was cancelled; at its end, to hand over
(publish its events and enqueue what follows) in one round trip. Model answers are journaled beside the
queue so that a step run again after a crash does not ask the model twice. `worker/queue/steps.py` does
this over Redis; `LocalQueue` does it in memory, for benchmarks and in-process tests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from shared.queue import StepTask


@dataclass
class HandOver:
    """What a step hands over at its end, in one round trip: its live events for followers, the steps that
    follow it (enqueued unless the job was cancelled, or the step is live already), and the journaled model
    answers it no longer needs. `stopped`: the job stopped with this step, so its events need not outlive
    it by long."""

    job_id: str
    epoch: int  # the submission the run descends from: a cancel after it refuses the tasks
    event_lines: list[str] = field(default_factory=list)
    tasks: list[StepTask] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    stopped: bool = False


class StepQueue(Protocol):
    async def is_cancelled(self, job_id: str, epoch: int) -> bool: ...

    async def hand_over(self, handed: HandOver) -> bool:
        """Do the hand-over; True when the tasks were refused because the job was cancelled."""

    async def save_answer(self, key: str, data: bytes) -> None: ...

    async def load_answer(self, key: str) -> bytes | None: ...


class LocalQueue:
    """Steps handed over in-process, without Redis: the loop driven directly (benchmarks, tests)."""

    def __init__(self) -> None:
        self.pending: deque[StepTask] = deque()
        self.answers: dict[str, bytes] = {}
        self.cancelled: dict[str, int] = {}  # job id -> when it was cancelled (ms)
        self.published: list[str] = []  # the live event lines, as a follower would read them

    async def is_cancelled(self, job_id: str, epoch: int) -> bool:
        return self.cancelled.get(job_id, -1) >= epoch

    async def hand_over(self, handed: HandOver) -> bool:
        cancelled = await self.is_cancelled(handed.job_id, handed.epoch)
        self.published.extend(handed.event_lines)
        if not cancelled:
            self.pending.extend(handed.tasks)
        for key in handed.answered:
            self.answers.pop(key, None)
        return cancelled and bool(handed.tasks)

    async def save_answer(self, key: str, data: bytes) -> None:
        self.answers[key] = data

    async def load_answer(self, key: str) -> bytes | None:
        return self.answers.get(key)
