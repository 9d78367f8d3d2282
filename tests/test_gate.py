"""The commit gate (worker/gate.py): how many steps commit at once, oldest first, aside while flushing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from worker.gate import Gate


async def test_no_more_than_its_size_hold_it_and_the_oldest_goes_first() -> None:
    gate = Gate(2)
    order: list[float] = []
    holding = 0
    most = 0
    release = asyncio.Event()

    async def step(since: float) -> None:
        nonlocal holding, most
        async with gate.slot(since):
            holding += 1
            most = max(most, holding)
            order.append(since)
            await release.wait()
            holding -= 1

    # the first two take the places; the others arrive youngest first and are served oldest first
    tasks = [asyncio.create_task(step(s)) for s in (1.0, 2.0, 9.0, 5.0, 3.0)]
    await asyncio.sleep(0.01)
    assert order == [1.0, 2.0]
    release.set()
    await asyncio.gather(*tasks)
    assert order == [1.0, 2.0, 3.0, 5.0, 9.0] and most == 2


async def test_a_step_aside_lets_another_in_and_comes_back_at_its_own_rank() -> None:
    gate = Gate(1)
    seen: list[str] = []
    flushed = asyncio.Event()

    async def old() -> None:
        async with gate.slot(1.0) as slot:
            seen.append("old in")
            async with slot.aside():  # waiting for a flush: its place is free meanwhile
                await flushed.wait()
            seen.append("old back")

    async def young() -> None:
        async with gate.slot(2.0):
            seen.append("young in")
            flushed.set()
            await asyncio.sleep(0.01)
            seen.append("young out")

    await asyncio.gather(old(), young())
    assert seen == ["old in", "young in", "young out", "old back"]


async def test_a_cancelled_step_never_keeps_a_place() -> None:
    gate = Gate(1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with gate.slot(1.0):
            await hold.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting.cancel()  # cancelled while waiting: takes nothing
    hold.set()
    await first
    assert (await asyncio.gather(waiting, return_exceptions=True))[0].__class__ is asyncio.CancelledError
    # given the place and cancelled before it ran: the place passes on
    hold.clear()
    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    granted = asyncio.create_task(holder())
    await asyncio.sleep(0)
    hold.set()
    await first  # its exit gives `granted` the place ...
    granted.cancel()  # ... which is cancelled before it resumes
    await asyncio.gather(granted, return_exceptions=True)
    async with asyncio.timeout(1):  # the place is free again
        async with gate.slot(5.0):
            pass


async def test_a_step_cancelled_while_aside_ends_without_waiting_for_a_place() -> None:
    gate = Gate(1)
    aside = asyncio.Event()
    forever = asyncio.Event()

    async def old() -> None:
        async with gate.slot(1.0) as slot, slot.aside():
            aside.set()
            await forever.wait()

    async def young() -> None:
        async with gate.slot(2.0):
            await forever.wait()  # holds the place for good

    first = asyncio.create_task(old())
    await aside.wait()
    second = asyncio.create_task(young())
    await asyncio.sleep(0.01)
    first.cancel()  # e.g. a shutdown: it must not wait for `young`'s place first
    async with asyncio.timeout(1):
        await asyncio.gather(first, return_exceptions=True)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


async def test_steps_waiting_on_a_records_lock_step_aside_for_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder of a job record's lock flushes aside; the steps spinning on that lock must wait aside too,
    or they fill the gate and the holder never gets back in (parallel branches of one job)."""
    from shared.models import Job
    from shared.store import JobStore, LocalBackend, flush

    if flush._SYNCFS is None:
        pytest.skip("no syncfs here")
    real = flush.GroupFlush._syncfs

    def slow(self: flush.GroupFlush) -> None:
        time.sleep(0.02)
        real(self)

    monkeypatch.setattr(flush.GroupFlush, "_syncfs", slow)
    store = JobStore.open(str(tmp_path / "perstack"))
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    store.save_job(Job(id="j1", coordinator_expert_key="e", status="running", started_at=1), new=True)
    flusher = flush.LoopFlush(backend.flush_group)
    gate = Gate(1)

    async def branch(n: int) -> None:
        def add(job: Job) -> Job:
            return job.model_copy(update={"total_steps": job.total_steps + 1})

        async with gate.slot(float(n)) as slot:
            await backend.run_async(store.update_job_steps("j1", add), flusher, None, slot.aside)

    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(branch(n) for n in range(4)))
    finally:
        flusher.close()
    final = store.load_job("j1")
    assert final is not None and final.total_steps == 4
