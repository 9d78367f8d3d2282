"""How many of a worker's steps commit and hand over at once, oldest first.

Steps whose model answers come back together (jobs started together: a burst) each await the store and
Redis several times on their way to the next step, and the event loop serves those awaits in turn. With no
limit, every step of a burst reached its next step near the burst's end, so the jobs slept, woke and queued
together again at each step (bench: concurrency). Through the gate, at most `size` steps are on that way at
once, the oldest first, so they reach their next steps one after another and spread out. A step that waits
for a shared flush of the store steps aside meanwhile: the flush's batch is as large as without the gate
(a flush can cost milliseconds, whatever it covers: bench: job throughput).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Gate:
    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []  # a heap: oldest first
        self._order = itertools.count()

    def slot(self, since: float) -> Slot:
        """A step's place, ranked by `since` (when the step began to wait: earlier goes first)."""
        return Slot(self, since)

    async def _acquire(self, since: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (since, next(self._order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given the place, then cancelled: pass it on
                self._release()
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


class Slot:
    """One step's place in the gate: `async with slot` holds it; `aside()` lets it go for a wait and takes
    it back after, at the step's own rank."""

    def __init__(self, gate: Gate, since: float) -> None:
        self._gate = gate
        self._since = since
        self._held = False

    async def __aenter__(self) -> Slot:
        await self._gate._acquire(self._since)
        self._held = True
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._held:
            self._held = False
            self._gate._release()

    def aside(self) -> _Aside:
        """Let the place go for a wait; take it back after, unless the wait failed or was cancelled (the
        step then ends without it: waiting for a place first would hold up a shutdown)."""
        return _Aside(self)


class _Aside:
    """`Slot.aside` as a plain class: entered at every wait of every step's writes, where a generator-based
    context manager cost a generator and two frames more each time."""

    __slots__ = ("_slot",)

    def __init__(self, slot: Slot) -> None:
        self._slot = slot

    async def __aenter__(self) -> None:
        slot = self._slot
        if slot._held:
            slot._held = False
            slot._gate._release()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        if exc_type is None:
            slot = self._slot
            await slot._gate._acquire(slot._since)
            slot._held = True
