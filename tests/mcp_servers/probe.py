"""A stdio MCP server for the tests: it reports on the process it runs in, and answers in every shape.

Run as `python tests/mcp_servers/probe.py`. It writes one line to stderr before serving, so the tests can
see skillStderr events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from typing import Any

from mcp import types
from mcp.server.mcpserver import MCPServer

# log_level CRITICAL: the SDK logs every failed call with a traceback, which would flood skillStderr
server = MCPServer("probe", version="1.2.3", log_level="CRITICAL")


@server.tool()
def pid() -> str:
    """The server's process id."""
    return str(os.getpid())


@server.tool()
def environ() -> str:
    """The server's environment, as JSON."""
    return json.dumps(dict(os.environ))


@server.tool()
def cwd() -> str:
    """The server's working directory."""
    return os.getcwd()


@server.tool()
def echo(text: str) -> str:
    """Say it back."""
    return text


@server.tool()
async def sleep(seconds: float) -> str:
    """Wait, then answer."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def fail(message: str) -> str:
    """Raise, so the result is an isError result."""
    raise ValueError(message)


@server.tool()
def shapes() -> list[Any]:
    """One block of every kind: text, image, embedded text, embedded blob, audio, resource link."""
    data = base64.b64encode(b"\x89PNG fake").decode()
    return [
        types.TextContent(type="text", text="plain"),
        types.ImageContent(type="image", data=data, mime_type="image/png"),
        types.EmbeddedResource(
            type="resource", resource=types.TextResourceContents(uri="file:///a.txt", text="embedded")
        ),
        types.EmbeddedResource(
            type="resource",
            resource=types.BlobResourceContents(uri="file:///b.pdf", blob=data, mime_type="application/pdf"),
        ),
        types.AudioContent(type="audio", data=data, mime_type="audio/wav"),
        types.ResourceLink(type="resource_link", name="c", uri="file:///c.txt"),
    ]


@server.tool()
def nothing() -> list[Any]:
    """An empty result."""
    return []


@server.tool()
def exit_now() -> str:
    """Die without answering."""
    os._exit(3)


if __name__ == "__main__":
    print(f"probe ready pid={os.getpid()}", file=sys.stderr, flush=True)
    server.run()
