"""An MCP server over HTTP for the tests: streamable HTTP at /mcp and the older SSE transport at /sse.

Run as `python tests/mcp_servers/remote.py PORT`; it serves on 127.0.0.1 until killed.
"""

from __future__ import annotations

import os
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.routing import Mount

server = MCPServer("remote-probe", version="0.1.0", log_level="CRITICAL")


@server.tool()
def add(a: int, b: int) -> str:
    """a + b"""
    return str(a + b)


@server.tool()
def pid() -> str:
    """The server's process id."""
    return str(os.getpid())


def app() -> object:
    http = server.streamable_http_app()
    # The SSE app answers at /sse and /messages/; mounted at the root after /mcp, it gets everything else.
    http.router.routes.append(Mount("/", app=server.sse_app()))
    return http


if __name__ == "__main__":
    uvicorn.run(app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
