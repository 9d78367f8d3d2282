"""One connected MCP server: a long-lived task owns its transport and session, others call through it.

The mcp SDK keeps its transports and sessions in anyio task groups, which must be entered and left by the
same task. A step's arq task ends long before the server should, so each server gets an owner task of its
own that opens the context managers, reports when the session is ready, and holds them until it is told to
stop or the connection drops. Steps call `session.call_tool` on the ready session from their own tasks.

The owner puts a relay between the transport's read stream and the session: the relay is the first to see
the stream end (a server that exited or was killed), so the session is marked lost at once and the next
step starts a fresh server before it calls, instead of learning of the death from a failed call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from worker.skills.mcp.launch import Launch, RemoteLaunch, StdioLaunch, check_resolved
from worker.skills.scope import SkillScope
from worker.skills.toolset import SkillError

log = logging.getLogger("perq.skills")

CONNECTION_CLOSED = -32000  # the SDK's code for "the transport ended under this request"
STDERR_TAIL = 5  # stderr lines kept to explain a server that dies during start-up
STOP_TIMEOUT_S = 10.0  # the SDK bounds its own shutdown (stdin close, SIGTERM, SIGKILL) well within this


class SkillConnectionLost(Exception):
    """The server went away (exited, killed, connection dropped) before or during a call."""


def root_cause(error: BaseException) -> BaseException:
    """anyio task groups wrap failures in exception groups; the first leaf says what happened."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def describe_error(error: BaseException) -> str:
    error = root_cause(error)
    if isinstance(error, MCPError):
        return error.message
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class Listener:
    """A step that is waiting on this server: it receives the server's stderr and disconnect events."""

    def __init__(self, scope: SkillScope | None, skill_name: str) -> None:
        self.scope, self.skill_name = scope, skill_name

    def emit(self, type_: str, **payload: Any) -> None:
        if self.scope is not None:
            self.scope.emit(type_, skillName=self.skill_name, **payload)


class SkillSession:
    def __init__(self, launch: Launch, *, allow_loopback: bool = False) -> None:
        self.launch = launch
        self.allow_loopback = allow_loopback
        self.tools: list[types.Tool] = []
        self.server_info: dict[str, str] | None = None
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.lost = False
        self.disconnect_reported = False  # skillDisconnected is emitted once, by whoever sees the loss first
        self._session: ClientSession | None = None
        self._listeners: list[Listener] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._name = ""

    @property
    def alive(self) -> bool:
        return self._session is not None and not self.lost and not self._stop.is_set()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @contextlib.contextmanager
    def listening(self, listener: Listener) -> Iterator[None]:
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def _broadcast(self, type_: str, **payload: Any) -> None:
        for listener in list(self._listeners):
            listener.emit(type_, **payload)

    # --- start and stop -----------------------------------------------------------------------------

    async def start(self, skill_name: str, scope: SkillScope | None, *, limit_s: float) -> None:
        """Spawn or connect, handshake, list tools; emits skillStarting, skillConnected. Raises SkillError."""
        self._name = skill_name
        listener = Listener(scope, skill_name)
        if isinstance(self.launch, StdioLaunch):
            listener.emit("skillStarting", command=self.launch.command, args=list(self.launch.args))
        else:
            listener.emit("skillStarting", endpoint=self.launch.endpoint, transport=self.launch.transport)
        ready: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        # Retrieved here so that a failure after a timed-out start is not reported as "never retrieved".
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        # A fresh context: the owner outlives the step that started it and must not carry that step's scope.
        self._task = asyncio.get_running_loop().create_task(self._own(ready), context=contextvars.Context())
        with self.listening(listener):
            try:
                timings = await asyncio.wait_for(asyncio.shield(ready), limit_s)
            except TimeoutError:
                await self.close()
                raise SkillError(
                    f"Skill {skill_name} did not connect within {limit_s:g} s ({self.launch.describe()})"
                ) from None
            except SkillError:
                await self.close()
                raise
            except Exception as e:
                await self.close()
                if self._stderr_task is not None:  # its last words usually say why it quit
                    await asyncio.wait({self._stderr_task}, timeout=1.0)
                raise SkillError(self._start_failure(skill_name, e)) from e
            except BaseException:  # the step itself was cancelled: leave no server behind
                await self.close()
                raise
        listener.emit("skillConnected", serverInfo=self.server_info, **timings)

    def _start_failure(self, skill_name: str, error: BaseException) -> str:
        cause = root_cause(error)
        launch = self.launch
        if isinstance(launch, StdioLaunch):
            if isinstance(cause, FileNotFoundError):
                return f"Skill {skill_name} could not start: command not found: {launch.command}"
            if isinstance(cause, OSError):
                return f"Skill {skill_name} could not start {launch.command}: {describe_error(cause)}"
            tail = " | ".join(self._stderr_tail)
            said = f"; its stderr ends: {tail}" if tail else ""
            return f"Skill {skill_name} failed during start-up ({describe_error(cause)}){said}"
        return f"Skill {skill_name} could not connect to {launch.endpoint}: {describe_error(cause)}"

    async def close(self) -> None:
        """Stop the owner task, which leaves the SDK's context managers (and so ends the server)."""
        self._stop.set()
        task = self._task
        if task is None or task.done():
            return
        if self._session is None:
            # Still starting, maybe stuck in a handshake that will never end: cancel it. The SDK's transport
            # shutdown is shielded and bounded, so the process is still stopped.
            task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        if not done:  # closing must never hang or fail the caller (Perstack #5: ignore close errors)
            task.cancel()
            log.warning("skill server %s did not stop in %s s", self.launch.describe(), STOP_TIMEOUT_S)

    # --- the owner task -----------------------------------------------------------------------------

    async def _own(self, ready: asyncio.Future[dict[str, int]]) -> None:
        try:
            async with AsyncExitStack() as stack:
                started = time.perf_counter()
                read, write = await self._open_transport(stack)
                spawned = time.perf_counter()
                relay_send, relay_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
                group = await stack.enter_async_context(anyio.create_task_group())
                # Unwound before the group is left, so the relay (blocked on the transport) is cancelled.
                stack.callback(group.cancel_scope.cancel)
                group.start_soon(self._relay, read, relay_send)
                session = await stack.enter_async_context(ClientSession(relay_receive, write))
                result = await session.initialize()
                handshaken = time.perf_counter()
                self.tools = await _all_tools(session)
                listed = time.perf_counter()
                info = result.server_info
                self.server_info = {"name": info.name, "version": info.version}
                self._session = session
                ready.set_result(_timings(started, spawned, handshaken, listed))
                await self._stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else SkillConnectionLost(describe_error(e)))
            elif not isinstance(e, asyncio.CancelledError):
                log.debug("skill server %s ended: %s", self.launch.describe(), describe_error(e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._session = None
            self.lost = True

    async def _open_transport(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        launch = self.launch
        if isinstance(launch, StdioLaunch):
            return await self._open_stdio(stack, launch)
        await check_resolved(self._name, launch, allow_loopback=self.allow_loopback)
        return await _open_remote(stack, launch)

    async def _open_stdio(self, stack: AsyncExitStack, launch: StdioLaunch) -> tuple[Any, Any]:
        # The server's stderr goes to a pipe of ours, so its lines become skillStderr events. The read end
        # is registered first, so it is closed after the SDK has stopped the server.
        read_fd, write_fd = os.pipe()
        errlog = os.fdopen(write_fd, "w")
        try:
            reader = asyncio.StreamReader()
            pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
            )
        except BaseException:
            os.close(read_fd)
            errlog.close()
            raise
        stack.callback(pipe.close)
        try:
            params = StdioServerParameters(
                command=launch.command, args=list(launch.args), env=dict(launch.env), cwd=launch.cwd
            )
            streams = await stack.enter_async_context(stdio_client(params, errlog=errlog))
        finally:
            errlog.close()  # the child holds its own copy; ours would keep the pipe open after it exits
        # Not in the owner's task group: it reads to the end of the pipe, after the session is torn down,
        # so the last lines of a server that quits during start-up still reach the error message.
        self._stderr_task = asyncio.get_running_loop().create_task(
            self._read_stderr(reader), context=contextvars.Context()
        )
        return streams[0], streams[1]

    async def _relay(
        self, source: MemoryObjectReceiveStream[Any], sink: MemoryObjectSendStream[SessionMessage | Exception]
    ) -> None:
        """Pass messages to the session; when the transport's stream ends, the server is gone."""
        async with sink:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
                async for message in source:
                    await sink.send(message)
        if not self._stop.is_set():
            self.lost = True
            log.warning("skill server %s (%s) disconnected", self._name, self.launch.describe())
            if self._listeners:
                self.disconnect_reported = True
                self._broadcast("skillDisconnected")
            self._stop.set()

    async def _read_stderr(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ValueError, OSError):  # ValueError: a line over the reader's limit
            while line := await reader.readline():
                message = line.decode(errors="replace").rstrip("\n")
                self._stderr_tail.append(message)
                if self._listeners:
                    self._broadcast("skillStderr", message=message)
                else:
                    log.debug("skill %s stderr: %s", self._name, message)

    # --- calls --------------------------------------------------------------------------------------

    async def call_tool(
        self, tool_name: str, args: dict[str, Any], *, limit_s: float, listener: Listener
    ) -> types.CallToolResult:
        """One tools/call. TimeoutError leaves the server up; a dropped connection marks it lost."""
        session = self._session
        if session is None or not self.alive:
            raise SkillConnectionLost("the server is not running")
        self.in_flight += 1
        try:
            with self.listening(listener):
                async with asyncio.timeout(limit_s):
                    return await session.call_tool(tool_name, args)
        except TimeoutError:
            raise  # the server may just be slow: it stays (TimeoutError is an OSError, so this comes first)
        except MCPError as e:
            if e.code == CONNECTION_CLOSED:
                self.lost = True
                self._stop.set()
                raise SkillConnectionLost(e.message) from e
            raise
        except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError) as e:
            self.lost = True
            self._stop.set()
            raise SkillConnectionLost(describe_error(e)) from e
        finally:
            self.in_flight -= 1
            self.touch()


async def _all_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


async def _open_remote(stack: AsyncExitStack, launch: RemoteLaunch) -> tuple[Any, Any]:
    if launch.transport == "sse":
        from mcp.client.sse import sse_client

        streams = await stack.enter_async_context(sse_client(launch.endpoint))
    else:
        from mcp.client.streamable_http import streamable_http_client

        streams = await stack.enter_async_context(streamable_http_client(launch.endpoint))
    return streams[0], streams[1]


def _timings(started: float, spawned: float, handshaken: float, listed: float) -> dict[str, int]:
    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    return {
        "spawnDurationMs": ms(spawned - started),
        "handshakeDurationMs": ms(handshaken - spawned),
        "connectDurationMs": ms(handshaken - started),
        "toolDiscoveryDurationMs": ms(listed - handshaken),
        "totalDurationMs": ms(listed - started),
    }
