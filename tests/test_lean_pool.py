"""The pool's lean commands (shared/queue/lean_pool.py), against a real Redis: a quiet connection is lent
without redis-py's reading check, one with a reply waiting is replaced (redis-py's own check fails that test
where the reply is still in the socket: its zero-timeout read is cancelled in the turn that reads the reply),
and commands are packed by hiredis into the bytes redis-py's own packing makes."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import select
import socket
import struct
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer

from shared.queue.broker import ArqRedis, open_pool
from shared.queue.lean_pool import reply_waiting
from tests.support.localredis import LocalRedis


class Three(enum.IntEnum):
    X = 3


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
    if where == "read by the loop":  # the transport reads the reply into the stream
        for _ in range(500):
            if connection._reader._buffer:
                break
            await asyncio.sleep(0.01)
        assert connection._reader._buffer
    else:
        # the loop does not run: the reply arrives in the socket and waits there
        poll = select.poll()
        poll.register(connection._writer.get_extra_info("socket").fileno(), select.POLLIN)
        assert poll.poll(5000)
    await pool.release(connection)
    assert reply_waiting(connection) is True
    assert await redis.get("quick:k") == b"mine"
    assert await redis.echo("fresh") == b"fresh"


async def test_a_connection_reset_by_the_server_is_replaced(redis_server: LocalRedis) -> None:
    """A reset (a proxy or a load balancer dropping an idle connection) leaves the error on the stream and
    the socket closed: the next command gets a new connection."""
    upstream = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    accepted: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(upstream))
        accepted.append(writer)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    pool = await open_pool(f"redis://127.0.0.1:{port}/0", "unused")
    try:
        await pool.set("quick:reset", "v")
        for writer in accepted:  # a reset, not a close: no end of file reaches the client
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        connection: Any = pool.connection_pool.get_available_connection()
        await pool.connection_pool.release(connection)
        for _ in range(500):
            if connection._reader.exception() is not None:
                break
            await asyncio.sleep(0.01)
        assert reply_waiting(connection) is True
        assert [await pool.get("quick:reset") for _ in range(3)] == [b"v"] * 3
    finally:
        await pool.aclose()
        proxy.close()


async def test_commands_are_packed_by_hiredis_into_redis_pys_own_bytes(redis: ArqRedis) -> None:
    commands: list[tuple[Any, ...]] = [
        ("SET", "k", "v", "EX", 100),
        ("CONFIG GET", "maxmemory"),  # a command name of two words, sent as two arguments
        (b"ZADD", "q", 1733030000000, "id", -1.5, "id2", float("-inf"), "id3"),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", b"\x00\xff" * 4000, "é" * 3000, 0, ""),
        ("SET", "k", Three.X),  # an int subclass: hiredis refuses it, redis-py's encoder writes it
    ]
    connection: Any = redis.connection_pool.get_available_connection()
    await redis.connection_pool.release(connection)
    for command in commands:
        assert b"".join(connection.pack_command(*command)) == b"".join(Connection().pack_command(*command))
    assert b"".join(connection.pack_commands(commands)) == b"".join(Connection().pack_commands(commands))
    assert await redis.execute_command("ECHO", "é" * 3000) == ("é" * 3000).encode()


async def test_the_pools_connections_pack_with_hiredis(
    redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection made for the pool's first PING too."""
    packed: list[tuple[Any, ...]] = []
    real = HiredisRespSerializer.pack

    def counted(self: HiredisRespSerializer, *args: Any) -> list[bytes]:
        packed.append(args)
        return real(self, *args)

    monkeypatch.setattr(HiredisRespSerializer, "pack", counted)
    pool = await open_pool(redis_server.url, "unused")
    try:
        assert await pool.echo("hiredis") == b"hiredis"
        assert ("ECHO", "hiredis") in packed
        assert len(pool.connection_pool._available_connections) == 1  # the PING's connection, reused
    finally:
        await pool.aclose()


async def test_a_burst_of_commands_each_gets_its_own_reply(redis: ArqRedis) -> None:
    replies = await asyncio.gather(*(redis.echo(f"n{i}") for i in range(200)))
    assert replies == [f"n{i}".encode() for i in range(200)]
