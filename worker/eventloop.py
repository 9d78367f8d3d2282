"""The event loop a worker runs on: uvloop's when it is installed (it is a dependency on Linux and macOS).

A worker's steps spend much of their CPU in the event loop itself: every Redis round trip is a socket write,
a readiness poll and a callback, and a step makes several. uvloop runs that machinery in C; the standard
loop runs it in Python. Nothing in perq depends on which loop runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new worker loop: uvloop's when importable, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def install() -> asyncio.AbstractEventLoop:
    """Make a worker loop this thread's current loop (arq's Worker picks up the current loop)."""
    loop = loop_factory()()
    asyncio.set_event_loop(loop)
    return loop
