"""Random bytes for ids and tokens: the system's (os.urandom, what `secrets` reads), fetched 4 KiB at a time.

A step makes about ten ids and a commit token, and where system calls are slow (VMs, sandboxes) each
getrandom call costs tens of microseconds: one per id was ~15% of a worker's time in `bench` (throughput).
A forked child (the supervisor's worker processes) starts on fresh bytes of its own, never its parent's.
"""

from __future__ import annotations

import os
import string
import struct
import threading

# base32's alphabet in lowercase, the spelling of ids; a byte's low five bits pick a character (256 is a
# multiple of 32: every character is as likely)
_SPELLING = bytes((string.ascii_lowercase + "234567").encode()[b % 32] for b in range(256))


class _RandomBytes:
    """Bytes handed out in order from a block of os.urandom, read again when used up, and ids spelled from
    them a batch at a time; thread-safe."""

    SIZE = 4096
    IDS = 64  # ids spelled at once: one translate and one unpack for all of them

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._at = 0
        self._ids: list[str] = []

    def new_id(self) -> str:
        with self._lock:
            if not self._ids:
                self._ids = self._spell(self.IDS)
            return self._ids.pop()

    def _spell(self, n: int) -> list[str]:
        """n ids (see `random_id`): 32 random bits for each first letter, then 23 bytes spelled in base32."""
        raw = os.urandom(27 * n)
        firsts = struct.unpack_from(f">{n}I", raw)
        rest = raw[4 * n :].translate(_SPELLING).decode()
        return [
            string.ascii_lowercase[first % 26] + rest[23 * i : 23 * i + 23] for i, first in enumerate(firsts)
        ]

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
    random bits), spelled by `bytes.translate` instead of base64's pure-Python b32encode, a batch at a time
    (a step makes about ten). The letter comes from 32 random bits: 2**32 % 26 leaves a bias below one in
    10**8."""
    return _RANDOM.new_id()


def random_token(n_bytes: int = 8) -> str:
    """Random hex, `secrets.token_hex`'s shape."""
    return _RANDOM.take(n_bytes).hex()
