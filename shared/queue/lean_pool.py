"""Two costs of redis-py's asyncio pool cut for every command perq sends: the check of a pooled connection,
answered without a turn of the event loop, and the packing of a command, done by hiredis.

The check. Before it lends a connection, redis-py's pool makes sure no reply of an earlier command waits on it
(`ConnectionPool.ensure_connection`, through the parser's `can_read_destructive`): it reads with a zero
timeout, which costs every command a turn of the event loop, a cancelled read and a TimeoutError raised and
caught. A worker sends two or three commands per step; a SET, measured alone on one connection (a loop of
them in one process, both ways interleaved), took 70-140 µs of CPU with that check and 45-90 µs with this one.

The same question is answered here at once: on a connected connection whose parser is hiredis's, a reply
waits when hiredis's reader or the connection's stream holds something, or its socket has something to read
(a poll with no timeout); then the connection is replaced, as redis-py's check replaces one that it finds
holding data. That check also misses a reply still in the socket, which this one sees (the test shows both).
A connection reset by the server (its stream holds the error, its socket is closed) is replaced too. A
connection of another make, or not connected yet, or a system without poll(), gets redis-py's own check.
redis-py's lock around lending stays: it keeps a burst of commands from opening a connection each, and
during a Sentinel failover it holds lenders back while a connect finds the new master.

The packing. redis-py's asyncio connections pack a command in Python, copying the growing buffer at each
argument (a hand-over's call carries a dozen, its events among them: 29 µs for one hand-over); its own sync
client packs with hiredis when hiredis is there (`HiredisRespSerializer`, 8 µs), which the connections made
here use too: the same bytes (the test compares them). An argument hiredis refuses (an int subclass, which
redis-py's encoder writes) is packed by redis-py's own code.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.connection import HiredisRespSerializer
from redis.exceptions import DataError
from redis.utils import HIREDIS_AVAILABLE

_poll = getattr(select, "poll", None)  # not on Windows

try:
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # redis-py moved it: every connection gets redis-py's own check
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]


def reply_waiting(connection: AbstractConnection) -> bool | None:
    """Whether something waits to be read on this connection: a reply of an earlier command, or the server's
    hang-up. None: not known here (not connected, or a parser or stream of another make)."""
    parser: Any = getattr(connection, "_parser", None)
    stream = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if _AsyncHiredisParser is None or type(parser) is not _AsyncHiredisParser or writer is None:
        return None
    buffered = getattr(stream, "_buffer", None)  # what the transport read and nobody took yet
    # hiredis's reader, with what it was fed and nobody took yet
    fed: Callable[[], bool] | None = getattr(getattr(parser, "_reader", None), "has_data", None)
    sock = writer.get_extra_info("socket")
    if not isinstance(stream, asyncio.StreamReader) or buffered is None or fed is None or sock is None:
        return None
    # a reset leaves its error on the stream and the socket closed (numbered -1), not an end of file
    if stream.at_eof() or stream.exception() is not None or sock.fileno() < 0 or buffered or fed():
        return True
    if _poll is None:
        return None
    poll = _poll()  # not select(): a worker's sockets may be numbered past its limit of 1024
    poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poll.poll(0))  # readable: a late reply, or a hang-up


def lean(pool: ConnectionPool) -> None:
    """Have `pool` lend a connection with nothing waiting on it without redis-py's reading check, replace
    one with something waiting (`reply_waiting`; any other gets redis-py's check), and make connections
    that pack their commands with hiredis, where it is installed."""
    thorough: Callable[[AbstractConnection], Awaitable[None]] = pool.ensure_connection

    async def ensure_connection(connection: AbstractConnection) -> None:
        waiting = reply_waiting(connection)  # None for one not connected: redis-py's check connects it
        if waiting is None:
            await thorough(connection)
        elif waiting:
            # what redis-py's check would do had it seen it (its zero-timeout read misses a reply still in
            # the socket: the timeout cancels the read in the very turn the loop reads the reply)
            await connection.disconnect()
            await connection.connect()

    make: Callable[[], AbstractConnection] = pool.make_connection
    hiredis_pack = HiredisRespSerializer().pack

    def packer(connection: AbstractConnection) -> Callable[..., list[bytes]]:
        python_pack = connection.pack_command

        def pack(*args: Any) -> list[bytes]:
            try:
                return hiredis_pack(*args)
            except DataError:  # refused by hiredis (an int subclass): redis-py's encoder may take it
                return python_pack(*args)

        return pack

    def make_connection() -> AbstractConnection:
        connection = make()
        setattr(connection, "pack_command", packer(connection))  # noqa: B010 (pack_commands calls it)
        return connection

    # the pool calls `self.ensure_connection` and `self.make_connection`: the instance's own are found first
    setattr(pool, "ensure_connection", ensure_connection)  # noqa: B010 (mypy refuses assigning a method)
    if HIREDIS_AVAILABLE:
        setattr(pool, "make_connection", make_connection)  # noqa: B010
        for made in getattr(pool, "_available_connections", []):  # the pool's first (its PING's)
            setattr(made, "pack_command", packer(made))  # noqa: B010
