"""The worker's Redis pool, watched: its pipelines counted, or each of their round trips made late (tests of
`worker/queue/batch.py` and of what sends through it)."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.queue.broker import ArqRedis


class CountingRedis:
    """The worker's pool, counting the pipelines sent through it (one per round trip)."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self.sent: list[int] = []  # how many commands each pipeline carried

    def pipeline(self, transaction: bool = False) -> Any:
        pipe = self.redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True) -> list[Any]:
            self.sent.append(len(pipe))
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = counted
        return pipe


class Late(CountingRedis):
    """The worker's pool, with every pipeline's round trip `delay_s` late."""

    def __init__(self, redis: ArqRedis, delay_s: float) -> None:
        super().__init__(redis)
        self.delay_s = delay_s

    def pipeline(self, transaction: bool = False) -> Any:
        pipe = super().pipeline(transaction)
        execute = pipe.execute

        async def late(raise_on_error: bool = True) -> list[Any]:
            await asyncio.sleep(self.delay_s)
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = late
        return pipe
