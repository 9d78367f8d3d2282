"""The pool's lean commands (shared/queue/lean_pool.py), against a real Redis: a quiet connection is lent
without redis-py's reading check, one with a reply waiting is replaced (redis-py's own check fails that test
where the reply is still in the socket: its zero-timeout read is cancelled in the turn that reads the reply),
and commands are packed by hiredis into the bytes redis-py's own packing makes."""

from __future__ import annotations

import asyncio
import select
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer

from shared.queue.broker import ArqRedis
from shared.queue.lean_pool import reply_waiting


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


async def test_commands_are_packed_by_hiredis_into_redis_pys_own_bytes(redis: ArqRedis) -> None:
    commands: list[tuple[Any, ...]] = [
        ("SET", "k", "v", "EX", 100),
        ("CONFIG GET", "maxmemory"),  # a command name of two words, sent as two arguments
        (b"ZADD", "q", 1733030000000, "id", -1.5, "id2", float("-inf"), "id3"),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", b"\x00\xff" * 4000, "é" * 3000, 0, ""),
    ]
    connection: Any = redis.connection_pool.get_available_connection()
    await redis.connection_pool.release(connection)
    # this pool's connections pack with hiredis, the one made for the pool's first PING too
    assert type(connection.pack_command.__self__) is HiredisRespSerializer
    for command in commands:
        assert b"".join(connection.pack_command(*command)) == b"".join(Connection().pack_command(*command))
    assert b"".join(connection.pack_commands(commands)) == b"".join(Connection().pack_commands(commands))
    assert await redis.execute_command("ECHO", "é" * 3000) == ("é" * 3000).encode()


async def test_a_burst_of_commands_each_gets_its_own_connection_and_reply(redis: ArqRedis) -> None:
    """Lent without redis-py's lock: connections made at once for a burst, none lent twice."""
    pool: Any = redis.connection_pool
    replies = await asyncio.gather(*(redis.echo(f"n{i}") for i in range(200)))
    assert replies == [f"n{i}".encode() for i in range(200)]
    assert not pool._in_use_connections
    assert len(pool._available_connections) > 1  # the burst did not wait on one connection
    assert not pool._lock.locked()
