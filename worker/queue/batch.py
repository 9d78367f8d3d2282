"""The Redis commands of a worker's running steps, sent together: one pipeline, one round trip, for all
that its steps asked while the previous batch was on its way.

A worker runs hundreds of steps at once, and each step asks Redis twice (its journal's SET, its
hand-over). Sent as one pipeline per step, each costs a socket write and read, a connection lent and
returned, and redis-py's work per pipeline: about 125-200 µs of the worker's CPU per hand-over on a
2-CPU VM, against 70 µs each when 5 go in one pipeline and 35 µs when 30 do (a loop of hand-over-like
pipelines, sent apart and together). The steps of a busy worker reach their Redis calls together (the
same turn of the event loop, or while a batch is away), so there the calls come together by themselves.

Batches go one at a time, in the order asked: what is asked while one is away waits for it and goes in the
next one. So a lone step waits for no one (its batch leaves from its own task, at once), a busy worker
sends fewer and larger batches, and a command asked after another runs after it (a lease dropped after the
take it undoes). A caller cancelled before its commands were taken into a batch sends nothing, as a
pipeline of its own would not have; one cancelled later may still have its commands run, and, when cut off
in the middle of sending them, run late: redis-py closes such a connection, which still delivers what it
was given, while the next batch goes on another one. That takes a batch of more than a connection's
buffer on its way (tens of MiB on one machine, hundreds of KiB over a network); a lease drop it overtakes
leaves its step to wait out the lease. A batch that gets no reply within `BATCH_TIMEOUT_S` (a connection
that went dead without a word) fails with redis-py's TimeoutError, its connection dropped, so that one
dead connection stalls the worker's steps for that long, not for good.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("perq.worker")
Command = tuple[Any, ...]  # a command's name and its arguments, as redis-py's execute_command takes them
# a batch with no reply this long fails: a hand-over's round trip takes milliseconds, a big batch on a busy
# Redis tenths of a second
BATCH_TIMEOUT_S = 30.0


class Commands(list[Command]):
    """The commands of one caller, in order, with the two pipeline methods `scripts.LuaScript.add_to` and a
    hand-over use (`evalsha`, `delete`); the position of each reply is its command's index."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self.append(("EVALSHA", sha, numkeys, *keys_and_args))

    def delete(self, *keys: str) -> None:
        self.append(("DEL", *keys))


Asked = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]  # a caller's commands, and its replies to come


class Batches:
    """Sends its callers' commands to Redis in batches, one batch at a time (see the module's docstring)."""

    def __init__(self, redis: Any, *, timeout_s: float = BATCH_TIMEOUT_S) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self._asked: list[Asked] = []
        self._sender: asyncio.Task[None] | None = None
        self._alone = False  # a caller's own batch is away, sent from its own task

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """Run `commands` in order in the next batch; their replies, an error in place of the reply of a
        command Redis refused (as `execute(raise_on_error=False)` gives them). Raises what the batch's round
        trip raised (a connection lost, no reply in time) or, alone, an argument that cannot be sent."""
        if not commands:
            return []
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not self._alone and not self._asked and (self._sender is None or self._sender.done()):
            # nothing away, nothing waiting: this caller's batch is its own and leaves at once, from its own
            # task (a sender's task would cost a turn of the loop: 50-100 µs a call for a lone step)
            self._sender = None  # an ended sender's callback, still to run, is not about those asked now
            self._alone = True
            try:
                await self._send([(commands, future)])
            finally:
                self._alone = False
                if self._asked:  # asked while it was away: theirs is the next batch
                    self._start_sender()
            return future.result()
        self._asked.append((commands, future))
        if not self._alone and (self._sender is None or self._sender.done()):
            self._start_sender()
        return await future

    def _start_sender(self) -> None:
        self._sender = asyncio.create_task(self._send_all())
        self._sender.add_done_callback(self._sender_ended)

    def _sender_ended(self, sender: asyncio.Task[None]) -> None:
        """A sender that stopped short (cancelled as its loop closes, even before it first ran; or failed)
        leaves none of its callers waiting. Those a newer sender has taken on since are that one's."""
        if self._sender is not sender:
            return
        self._sender = None
        cancelled = sender.cancelled()
        failure = None if cancelled else sender.exception()
        if failure is not None:
            log.error("the sender of the worker's Redis batches failed", exc_info=failure)
        if cancelled or failure is not None:
            asked, self._asked = self._asked, []
            for _, future in asked:
                if failure is None:
                    future.cancel()
                elif not future.done():
                    future.set_exception(failure)

    async def _send_all(self) -> None:
        while self._asked:
            # a caller cancelled meanwhile has its future cancelled before its task hears of it
            batch = [(commands, future) for commands, future in self._asked if not future.done()]
            self._asked = []
            if batch:
                await self._send(batch)

    async def _send(self, batch: list[Asked]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for commands, _ in batch:
                        for command in commands:
                            pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
        except DataError as e:  # an argument that cannot be packed: nothing was sent, and it is one caller's
            if len(batch) > 1:
                for one in batch:
                    if not one[1].done():  # not cancelled meanwhile
                        await self._send([one])
                return
            _fail(batch, e)
            return
        except TimeoutError as e:  # asyncio's: redis-py dropped the connection when its read was cancelled
            what = f"no reply from Redis within {self.timeout_s:g} s to a batch of {len(batch)} callers"
            _fail(batch, RedisTimeoutError(what), cause=e)
            return
        except Exception as e:  # the round trip failed: every caller of the batch hears it
            _fail(batch, e)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        at = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[at : at + len(commands)])
            at += len(commands)


def _fail(batch: list[Asked], error: Exception, cause: BaseException | None = None) -> None:
    """Each caller of `batch` gets an error of its own: one object raised in many tasks would gather all
    their tracebacks (the first caller gets `error` itself)."""
    for n, (_, future) in enumerate(batch):
        if future.done():
            continue
        own = error if n == 0 else _copy(error)
        if own is not error or cause is not None:
            own.__cause__ = cause or error
        future.set_exception(own)


def _copy(error: Exception) -> Exception:
    try:
        return copy.copy(error)
    except Exception:  # one that cannot be made again from its arguments: shared, then
        return error
