"""The pool's quick check of a connection (shared/queue/quick_check.py), against a real Redis: a quiet
connection is lent without redis-py's reading check, one with a reply waiting is replaced. redis-py's own
check fails the second test where the reply is still in the socket (its zero-timeout read is cancelled in
the turn that reads the reply)."""

from __future__ import annotations

import asyncio
import select
from typing import Any

import pytest

from shared.queue.broker import ArqRedis
from shared.queue.quick_check import reply_waiting


async def test_a_quiet_connection_is_lent_without_the_reading_check(redis: ArqRedis) -> None:
    await redis.set("quick:k", "v")
    pool = redis.connection_pool
    connection = pool.get_available_connection()
    await pool.release(connection)
    assert reply_waiting(connection) is False
    checks: list[int] = []

    async def reading_check() -> bool:
        checks.append(1)
        return False

    connection.can_read_destructive = reading_check  # type: ignore[method-assign]
    assert await redis.get("quick:k") == b"v"
    assert checks == []  # the one connection was lent as it was


@pytest.mark.parametrize("where", ["read by the loop", "still in the socket"])
async def test_a_reply_left_on_a_connection_never_answers_the_next_command(
    redis: ArqRedis, where: str
) -> None:
    """A command sent and never read (a client interrupted between the two) leaves its reply on the
    connection: the next command lent that connection must not take it for its own."""
    await redis.set("quick:k", "mine")
    pool = redis.connection_pool
    connection: Any = await pool.get_connection()
    await connection.send_command("ECHO", "stale")
    if where == "read by the loop":
        await asyncio.sleep(0.1)  # the transport reads the reply into the stream
    else:
        # the loop does not run: the reply arrives in the socket and waits there
        poll = select.poll()
        poll.register(connection._writer.get_extra_info("socket").fileno(), select.POLLIN)
        assert poll.poll(5000)
    await pool.release(connection)
    assert reply_waiting(connection) is True
    assert await redis.get("quick:k") == b"mine"
    assert await redis.echo("fresh") == b"fresh"
