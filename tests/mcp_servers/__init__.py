"""MCP servers written for the tests, and how the tests start them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = HERE / "probe.py"
REMOTE = HERE / "remote.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def remote_server() -> Iterator[int]:
    """tests/mcp_servers/remote.py on 127.0.0.1; yields its port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REMOTE), str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the remote MCP test server did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()
