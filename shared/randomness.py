"""Random bytes for ids and tokens: the system's (os.urandom, what `secrets` reads), fetched 4 KiB at a time.

A step makes about ten ids and a commit token, and where system calls are slow (VMs, sandboxes) each
getrandom call costs tens of microseconds: one per id was ~15% of a worker's time in `bench` (throughput).
A forked child (the supervisor's worker processes) starts on fresh bytes of its own, never its parent's.
"""

from __future__ import annotations

import os
import string
import threading

# base32's alphabet in lowercase, the spelling of ids; a byte's low five bits pick a character (256 is a
# multiple of 32: every character is as likely)
_SPELLING = bytes((string.ascii_lowercase + "234567").encode()[b % 32] for b in range(256))


class _RandomBytes:
    """Bytes handed out in order from a block of os.urandom, read again when used up; thread-safe."""

    SIZE = 4096

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            at = self._at
            if at + n > len(self._buf):
                self._buf, at = os.urandom(self.SIZE), 0
            self._at = at + n
            return self._buf[at : at + n]


_RANDOM = _RandomBytes()
os.register_at_fork(after_in_child=_RANDOM.reset)


def random_id() -> str:
    """A cuid2-shaped id: a lowercase letter, then 23 lowercase letters and digits 2-7 (base32's, 115
    random bits), spelled by one `bytes.translate` instead of base64's pure-Python b32encode."""
    raw = _RANDOM.take(27)
    # the letter from 32 random bits: 2**32 % 26 leaves a bias below one in 10**8
    return string.ascii_lowercase[int.from_bytes(raw[:4], "big") % 26] + raw[4:].translate(_SPELLING).decode()


def random_token(n_bytes: int = 8) -> str:
    """Random hex, `secrets.token_hex`'s shape."""
    return _RANDOM.take(n_bytes).hex()
