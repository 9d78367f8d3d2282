"""The Redis commands of a worker's running steps, sent together: one pipeline, one round trip, for all
that its steps asked while the previous batch was on its way.

A worker runs hundreds of steps at once, and each step asks Redis twice (its journal's SET, its
hand-over). Sent as one pipeline per step, each costs a socket write and read, a connection lent and
returned, and redis-py's work per pipeline: about 125-200 µs of the worker's CPU per hand-over on a
2-CPU VM, against 70 µs each when 5 go in one pipeline and 35 µs when 30 do (a loop of hand-over-like
pipelines, sent apart and together). The steps of a busy worker reach their Redis calls together (the
same turn of the event loop, or while a batch is away), so there the calls come together by themselves.

Batches go one at a time, in the order asked: what is asked while one is away waits for it and goes in the
next one. So a lone step waits for no one but the start of the sender's task, a busy worker sends fewer
and larger batches, and a command asked after another runs after it (a lease dropped after the take it
undoes). What a step asked and was cancelled from before its batch left is not sent, as a pipeline of its
own would not have been.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

Command = tuple[Any, ...]  # a command's name and its arguments, as redis-py's execute_command takes them


class Commands(list[Command]):
    """The commands of one caller, in order, with the two pipeline methods `scripts.LuaScript.add_to` and a
    hand-over use (`evalsha`, `delete`); the position of each reply is its command's index."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self.append(("EVALSHA", sha, numkeys, *keys_and_args))

    def delete(self, *keys: str) -> None:
        self.append(("DEL", *keys))


class Batches:
    """Sends its callers' commands to Redis in batches, one batch at a time (see the module's docstring)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._asked: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """Run `commands` in order in the next batch; their replies, an error in place of the reply of a
        command Redis refused (as `execute(raise_on_error=False)` gives them). Raises what the batch's round
        trip raised (a connection lost)."""
        if not commands:
            return []
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._asked.append((commands, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all())
        return await future  # cancelled before its batch left: left out of it (`_send_all`)

    async def _send_all(self) -> None:
        try:
            while self._asked:
                # a caller cancelled meanwhile has its future cancelled before its task hears of it
                batch = [(commands, future) for commands, future in self._asked if not future.done()]
                self._asked = []
                if batch:
                    await self._send(batch)
        except BaseException:  # this task cancelled (its loop closing): so are the callers still waiting
            for _, future in self._asked:
                future.cancel()
            self._asked = []
            raise
        finally:
            self._sender = None

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for commands, _ in batch:
                    for command in commands:
                        pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as e:  # the round trip failed: every caller of the batch hears it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
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
