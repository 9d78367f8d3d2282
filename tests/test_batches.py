"""`worker/queue/batch.py`: the Redis commands of a worker's steps, sent together, against a real Redis.

What the steps rely on: each caller gets the replies of its own commands, in order, an error in place of a
refused command's reply and nowhere else; what is asked together goes in one round trip; what is asked
while a batch is away goes in the next one, after it; a caller cancelled before its batch left sends
nothing; a failed round trip reaches every caller of its batch, and the next batch goes on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.queue.broker import ArqRedis, open_pool
from tests.support.localredis import LocalRedis, free_port
from tests.support.pipelines import CountingRedis, Late
from worker.queue.batch import Batches, Commands


def _key(name: str) -> str:
    return f"perq:test:batch:{time.monotonic_ns()}:{name}"


async def test_callers_together_share_one_round_trip_and_each_gets_its_own_replies(redis: ArqRedis) -> None:
    """A caller that finds nothing away sends at once, alone; the callers that come while its batch is away
    share the next round trip, each with the replies of its own commands."""
    counting = CountingRedis(redis)
    batches = Batches(counting)
    a, b, text = _key("a"), _key("b"), _key("text")
    await redis.set(text, "not a number")
    first = Commands([("SET", a, "1"), ("INCR", a)])
    second = Commands([("INCR", text), ("SET", b, "2")])
    second.delete(b)
    third = [("GET", a)]
    asked = asyncio.gather(batches.send(first), batches.send(second), batches.send(third))
    one, two, three = await asyncio.wait_for(asked, 5)  # a batch nobody sends fails here, not hangs
    assert counting.sent == [2, 4]
    assert one == [True, 2]
    assert isinstance(two[0], ResponseError) and two[1:] == [True, 1]  # the refusal is this caller's alone
    assert three == [b"2"]  # run after the other callers' commands asked before it


async def test_what_is_asked_while_a_batch_is_away_goes_next_and_after_it(redis: ArqRedis) -> None:
    counting = CountingRedis(redis)
    batches = Batches(counting)
    key = _key("list")
    away = asyncio.ensure_future(batches.send([("RPUSH", key, "first")]))
    await asyncio.sleep(0)  # the sender's task is started: its batch leaves
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(batches.send([("RPUSH", key, f"later{i}")])) for i in range(3)]
    assert await asyncio.wait_for(asyncio.gather(away, *later), 5) == [[1], [2], [3], [4]]
    assert counting.sent == [1, 3]
    assert await redis.lrange(key, 0, -1) == [b"first", b"later0", b"later1", b"later2"]
    assert await batches.send([]) == [] and counting.sent == [1, 3]  # nothing asked, nothing sent


async def test_a_caller_cancelled_before_its_batch_left_sends_nothing(redis: ArqRedis) -> None:
    counting = CountingRedis(redis)
    batches = Batches(counting)
    kept, dropped = _key("kept"), _key("dropped")
    sending = asyncio.ensure_future(batches.send([("SET", kept, "1")]))
    cancelled = asyncio.ensure_future(batches.send([("SET", dropped, "1")]))
    await asyncio.sleep(0)  # both asked; the sender's task has not run yet
    cancelled.cancel()
    assert await sending == [True]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert counting.sent == [1] and await redis.get(dropped) is None


async def test_a_failed_round_trip_reaches_every_caller_of_its_batch_and_the_next_goes_on(
    redis_server: LocalRedis,
) -> None:
    from redis.asyncio import Redis

    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    batches = Batches(down)
    results = await asyncio.gather(
        batches.send([("SET", _key("a"), "1")]), batches.send([("GET", _key("b"))]), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results)
    # the batches outlive the failure: once Redis answers, the next batch goes
    batches.redis = await open_pool(redis_server.url, "unused")
    key = _key("after")
    assert await batches.send([("SET", key, "1"), ("GET", key)]) == [True, b"1"]
    await batches.redis.aclose()
    await down.aclose()


async def test_the_journal_writes_and_hand_overs_of_concurrent_steps_share_a_round_trip(
    redis: ArqRedis,
) -> None:
    """What the worker's steps ask of Redis (`RedisStepQueue`) goes through its batches."""
    from shared.queue import StepTask, step_job_id
    from worker.queue.scripts import load_scripts
    from worker.queue.steps import RedisStepQueue
    from worker.step_queue import HandOver

    await load_scripts(redis)
    counting = CountingRedis(redis)
    queue = _key("queue")
    steps = RedisStepQueue(redis, queue, lambda _ids: None)
    steps.batches = Batches(counting)
    tasks = [StepTask(job_id=f"j{n}", run_id=f"r{n}", step_number=2) for n in range(2)]
    answer = _key("answer")
    await asyncio.gather(
        steps.save_answer(answer, b"{}"),
        *(
            steps.hand_over(HandOver(t.job_id, epoch=1, event_lines=['{"type":"x"}'], tasks=[t]))
            for t in tasks
        ),
    )
    assert counting.sent == [1, 4]  # the SET at once; then each hand-over's events and enqueue, together
    assert await redis.get(answer) == b"{}"
    assert sorted(await redis.zrange(queue, 0, -1)) == sorted(step_job_id(t).encode() for t in tasks)


async def test_a_cancelled_sender_leaves_no_caller_waiting_and_a_new_one_takes_over(redis: ArqRedis) -> None:
    """The sender's task cancelled (its loop closing) with one batch away and a caller waiting for the next:
    both are cancelled, none is left waiting; a later caller is served."""
    batches = Batches(Late(redis, 0.2))
    first = asyncio.ensure_future(batches.send([("SET", _key("first"), "1")]))  # leaves at once, alone
    await asyncio.sleep(0.05)
    away = asyncio.ensure_future(batches.send([("SET", _key("away"), "1")]))  # the sender's first batch
    await asyncio.sleep(0.25)  # the first came back; the sender's batch is away
    waiting = asyncio.ensure_future(batches.send([("SET", _key("waiting"), "1")]))
    await asyncio.sleep(0)
    assert await first == [True] and not away.done() and not waiting.done()
    sender = batches._sender
    assert sender is not None
    sender.cancel()
    for caller in (away, waiting):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 2)
    key = _key("after")
    assert await asyncio.wait_for(batches.send([("SET", key, "1"), ("GET", key)]), 2) == [True, b"1"]


async def test_an_argument_that_cannot_be_sent_fails_its_caller_alone(redis: ArqRedis) -> None:
    from redis.exceptions import DataError

    counting = CountingRedis(redis)
    batches = Batches(counting)
    good, bad = _key("good"), _key("bad")
    results = await asyncio.gather(
        batches.send([("SET", good, "1")]), batches.send([("SET", bad, {"a": 1})]), return_exceptions=True
    )
    assert results[0] == [True] and isinstance(results[1], DataError)
    assert await redis.get(good) == b"1" and await redis.get(bad) is None


async def test_a_batch_without_a_reply_fails_in_time_and_the_next_goes_on(redis_server: LocalRedis) -> None:
    """A connection that went dead without a word (here a server that never answers) fails its batch after
    the batch's timeout with redis-py's TimeoutError, an error object per caller; the next batch goes on."""
    from redis.asyncio import Redis
    from redis.exceptions import TimeoutError as RedisTimeoutError

    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads everything, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mute = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    batches = Batches(mute, timeout_s=0.3)
    asked = asyncio.gather(
        batches.send([("SET", _key("a"), "1")]), batches.send([("GET", _key("b"))]), return_exceptions=True
    )
    results = await asyncio.wait_for(asked, 5)
    assert all(isinstance(r, RedisTimeoutError) for r in results) and results[0] is not results[1]
    batches.redis = await open_pool(redis_server.url, "unused")
    key = _key("after")
    assert await batches.send([("SET", key, "1"), ("GET", key)]) == [True, b"1"]
    await batches.redis.aclose()
    await mute.aclose()
    server.close()


async def test_an_error_that_cannot_be_copied_still_reaches_every_caller(redis: ArqRedis) -> None:
    class Odd(Exception):
        def __init__(self, *, what: str) -> None:  # not made again from its arguments by copy.copy
            super().__init__(what)

    class Failing(CountingRedis):
        def pipeline(self, transaction: bool = False) -> Any:
            pipe = super().pipeline(transaction)

            async def fail(raise_on_error: bool = True) -> list[Any]:
                await asyncio.sleep(0.05)
                raise Odd(what="down")

            pipe.execute = fail
            return pipe

    batches = Batches(Failing(redis))
    asked = asyncio.gather(*(batches.send([("GET", _key(str(n)))]) for n in range(3)), return_exceptions=True)
    results = await asyncio.wait_for(asked, 5)  # the first alone, the other two in one batch
    assert all(isinstance(r, Odd) for r in results)
