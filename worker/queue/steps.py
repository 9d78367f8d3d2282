"""How a worker's steps talk to Redis: the cancel check, journaled answers, and the hand-over.

The hand-over is one round trip: the step's events go onto the job's stream (`publish.lua`, one call for
all of them) and every step that follows is enqueued by `enqueue.lua`, which does what arq's `enqueue_job`
does (refuse a live duplicate id, write the job, add it to the queue) without arq's WATCH round trips, and
refuses to enqueue for a cancelled job.
arq workers cannot tell these jobs from the ones `enqueue_job` writes: the payload is built by
`shared.queue.broker.step_payload`. `worker/step_queue.py` holds what a step needs of any queue; this is
the Redis one.

The step that hands over is finished in the same round trip (its arq keys deleted and its id taken off the
queue, as arq's `finish_job` does), by the last enqueue when there is one, so that a cancelled job, whose
enqueue is refused, keeps the step until the worker finishes it after the step's own cancel handling; a step
that hands nothing on is finished by `publish.lua`, the call that publishes its events.
The worker says which step runs through `FINISHING`, a context variable set in the step's own task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from arq.constants import retry_key_prefix

from shared.events import STREAM_MAXLEN, stream_lifetime_s
from shared.models import now_ms
from shared.queue import cancel_key, events_channel, step_job_id
from shared.queue.broker import (
    expires_extra_ms,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    step_payload,
)
from worker.queue.batch import Batches, Commands
from worker.queue.scripts import DROP, ENQUEUE, PUBLISH, Arg, ScriptCall, settle
from worker.step_queue import HandOver

log = logging.getLogger("perq.worker")
ANSWER_TTL_S = 24 * 3600
REFUSED_CANCELLED = -1  # enqueue.lua's reply for a job cancelled after the step's submission


class Finish:
    """The arq job of the step running in this task; `done` once the hand-over finished it."""

    __slots__ = ("arq_id", "done")

    def __init__(self, arq_id: str) -> None:
        self.arq_id = arq_id
        self.done = False

    def keys(self) -> list[str]:
        """What arq's finish deletes: the lease (in-progress key), the try counter and the job."""
        return [
            in_progress_key_prefix + self.arq_id,
            retry_key_prefix + self.arq_id,
            job_key_prefix + self.arq_id,
        ]


FINISHING: ContextVar[Finish | None] = ContextVar("perq_finishing", default=None)


_DROPPING: set[asyncio.Future[Any]] = set()  # the loop keeps tasks weakly: these are kept till they end


async def drops_settled(timeout_s: float) -> None:
    """Wait, up to `timeout_s`, for the lease drops still on their way (a worker's shutdown, before its pool
    closes: a take that could not start then frees its step at once instead of when its lease lapses)."""
    if _DROPPING:
        await asyncio.wait(set(_DROPPING), timeout=timeout_s)


def _dropped(task: asyncio.Future[Any]) -> None:
    _DROPPING.discard(task)
    if not task.cancelled() and task.exception() is not None:  # the lease lapses instead: a try more
        log.warning("could not drop the lease of a step taken but not started: %r", task.exception())


@dataclass(frozen=True)
class Picked:
    """A step taken by this worker: its arq id, its queue score, its job's cancel mark (None: none), the job
    as arq stored it (None: its key expired) and this try of it (arq's counter, counted at pick-up)."""

    arq_id: str
    score: int
    cancel_mark: int | None
    job: bytes | None
    tries: int


@dataclass(frozen=True)
class Taking:
    """How a worker takes the first step a step of its hands on, in the hand-over's own round trip: the
    handing step's room is about to be free, and the poll loop, which on a busy worker waits its turn behind
    every other step at each of its round trips, is not in between (bench: step handoff, concurrency)."""

    owner: str  # the lease owner: this worker
    lease_ms: int
    allowed: Callable[[], bool]  # not while the worker drains
    start: Callable[[Picked], None]  # runs the step
    running: Callable[[str], bool]  # whether the worker runs this step already (by arq id)


def _log_side_errors(
    job_id: str, replies: list[Any], publishing: ScriptCall | None, dropping: int | None
) -> None:
    """Log what a hand-over could not do beside handing on: publish the step's events (a live copy of what
    the store holds: `publish.lua` says so with a string), or drop its journaled answers (they expire). Not
    raised: the step is committed and handed on, and an error raised here would count as the step failing,
    which on its last try stops a job whose next step runs."""
    events = replies[publishing.position] if publishing is not None else None
    if isinstance(events, Exception | bytes | str):
        log.warning("could not publish the events of job %s to its stream: %s", job_id, _text(events))
    if dropping is not None and isinstance(replies[dropping], Exception):
        log.warning("could not drop the journaled answers of job %s: %s", job_id, replies[dropping])


def _text(reply: Exception | bytes | str) -> str:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    return text.strip()  # Redis 6 hands a script's refusal over with its line's end


class RedisStepQueue:
    def __init__(self, redis: Any, queue_name: str, enqueued: Callable[[list[str]], None]) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.enqueued = enqueued  # tells this worker's poll loop, which takes the steps at once
        self.taking: Taking | None = None  # set by the worker that runs this queue's steps
        self.batches = Batches(redis)  # the hand-overs and journal writes of all its steps, sent together

    async def is_cancelled(self, job_id: str, epoch: int) -> bool:
        """Whether `perq cancel` came after the submission this run descends from."""
        cancelled = await self.redis.get(cancel_key(job_id))
        return cancelled is not None and int(cancelled) >= epoch

    async def hand_over(self, handed: HandOver) -> bool:
        """Publish the step's events, enqueue what follows it and drop its journaled answers, in one round
        trip. True when the job was cancelled after the step's submission: then nothing was enqueued. A
        step whose id is live already (queued, or running elsewhere) is left as it is."""
        tasks, epoch = handed.tasks, handed.epoch
        if not (handed.event_lines or tasks or handed.answered):
            return False
        now = now_ms()
        calls: list[ScriptCall] = []
        finish = FINISHING.get()
        if finish is not None and finish.done:
            finish = None
        # a step run by a worker takes the first step it hands on (its own room): see `Taking`
        taking = self.taking if finish is not None else None
        if taking is not None and not taking.allowed():
            taking = None
        payloads: list[bytes] = []
        enqueues: list[ScriptCall] = []
        publishing: ScriptCall | None = None
        dropping: int | None = None  # where the reply of the answers' DEL is
        commands = Commands()  # sent in the worker's next batch (`batch.py`)
        # the events, and the finish of a step that hands nothing on, in one call (`publish.lua`)
        finished = finish if finish is not None and not tasks else None
        if handed.event_lines or finished is not None:
            stream = [events_channel(handed.job_id)]
            if finished is not None:
                stream += [*finished.keys(), self.queue_name]
            lifetime = stream_lifetime_s(handed.stopped)
            published: list[Arg] = [STREAM_MAXLEN, lifetime, finished.arq_id if finished else ""]
            published += handed.event_lines
            PUBLISH.add_to(commands, stream, published, calls)
            publishing = calls[-1]
        for i, task in enumerate(tasks):
            arq_id = step_job_id(task)
            keys = [job_key_prefix + arq_id, result_key_prefix + arq_id, self.queue_name]
            keys.append(cancel_key(handed.job_id))
            payloads.append(step_payload(task, now))
            args: list[Arg] = [payloads[-1], now, expires_extra_ms, arq_id, epoch]
            finishing = finish if i == len(tasks) - 1 else None
            if finishing is not None or (taking and i == 0):
                # the finished step's keys, or (none finished) three the script does not read
                keys.extend(finishing.keys() if finishing is not None else keys[:3])
                args.append(finishing.arq_id if finishing is not None else "")
            if taking and i == 0:
                keys += [in_progress_key_prefix + arq_id, retry_key_prefix + arq_id]
                args += [taking.owner, taking.lease_ms]
            ENQUEUE.add_to(commands, keys, args, enqueues)
        calls += enqueues
        if handed.answered:
            dropping = len(commands)
            commands.delete(*handed.answered)
        left = [step_job_id(t) for t in tasks]
        replies: list[Any] = []
        try:
            replies = await self.batches.send(commands)
            await settle(self.redis, self.batches, replies, calls, raising=False)  # fills in `replies`
            # what the hand-over is: the enqueues, and the finish of a step that hands nothing on
            essential = [c.position for c in enqueues]
            if finished is not None and publishing is not None:
                essential.insert(0, publishing.position)
            for position in essential:
                if isinstance(replies[position], Exception):
                    raise replies[position]
        finally:
            if taking is not None and enqueues:
                self._started(taking, replies[enqueues[0].position] if replies else None, left, now, payloads)
        refused = any(replies[c.position] == REFUSED_CANCELLED for c in enqueues)
        if finish is not None:
            finish.done = not tasks or replies[enqueues[-1].position] != REFUSED_CANCELLED
        if left:
            self.enqueued(left)
        _log_side_errors(handed.job_id, replies, publishing, dropping)
        return refused

    def _started(self, taking: Taking, reply: Any, left: list[str], now: int, payloads: list[bytes]) -> None:
        """Start the step the hand-over took (taken out of `left`): whatever else failed in the round trip,
        and unless the worker began to drain meanwhile. A take that cannot start (draining, or its reply lost
        to a cancel or an error) has its lease dropped, so that any worker takes the step at once."""
        arq_id = left[0]
        if isinstance(reply, list) and taking.allowed():
            _, tries, mark = reply
            left.pop(0)
            taking.start(Picked(arq_id, now, int(mark) if mark else None, payloads[0], int(tries)))
        elif not isinstance(reply, int) and not taking.running(arq_id):
            # taken, or perhaps taken (the reply lost, or an error in place of the script's): -1, 0 and 1
            # say no lease was set; a step this worker already runs under its own lease is left alone
            # through the batches: after the take it undoes, which may not have left yet
            task = asyncio.ensure_future(self._drop(in_progress_key_prefix + arq_id, taking.owner))
            _DROPPING.add(task)
            task.add_done_callback(_dropped)

    async def _drop(self, lease_key: str, owner: str) -> None:
        calls: list[ScriptCall] = []
        dropping = Commands()
        DROP.add_to(dropping, [lease_key], [owner], calls)
        await settle(self.redis, self.batches, await self.batches.send(dropping), calls)

    async def save_answer(self, key: str, data: bytes) -> None:
        [saved] = await self.batches.send([("SET", key, data, "EX", ANSWER_TTL_S)])
        if isinstance(saved, Exception):
            raise saved

    async def load_answer(self, key: str) -> bytes | None:
        value = await self.redis.get(key)
        return bytes(value) if value is not None else None
