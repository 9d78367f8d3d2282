"""The base of every schema (camelCase JSON, snake_case Python), ids, time and token usage."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from shared.randomness import random_id


class PerqModel(BaseModel):
    """Base of every schema: camelCase JSON, snake_case Python, unknown keys ignored (lenient loading)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- ids and time -------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def _spell(digest: bytes) -> str:
    # base32 in lowercase: 24 characters from 15 bytes, computed in C (a step makes about ten ids)
    return base64.b32encode(digest).decode().lower()


def new_id() -> str:
    """A cuid2-shaped id: a lowercase letter, then 23 lowercase letters and digits (120 random bits)."""
    return random_id()  # buffered system randomness (shared/randomness.py)


def derived_id(*parts: str) -> str:
    """A cuid2-shaped id computed from its parts, so that a re-run of the same work names the same thing."""
    return "c" + _spell(hashlib.blake2b(":".join(parts).encode(), digest_size=15).digest())[:23]


@functools.lru_cache(maxsize=4096)
def checkpoint_id(run_id: str, step_number: int) -> str:
    """The id of the checkpoint that ends a step of a run: derived, so that a re-run step finds it. Kept for
    the runs a process has seen last: a step asks for its own, its previous and its next one several times
    (a hash each, 2% of a worker's time)."""
    return derived_id("checkpoint", run_id, str(step_number))


def is_safe_id(value: str) -> bool:
    """Ids become path segments and Redis keys: letters, digits, '-' and '_' only, no '..' or separators."""
    return bool(_ID_RE.match(value))


def check_id(value: str, what: str = "id") -> str:
    if not is_safe_id(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '-' and '_' (at most 128)")
    return value


SafeId = Annotated[str, Field(pattern=_ID_RE.pattern)]


def now_ms() -> int:
    # rounded as arq rounds its scores: a truncated "now" saw a step arq enqueued within the same
    # millisecond as not yet due (the poll skipped it, the pick-up refused it)
    return round(time.time() * 1000)


# --- usage --------------------------------------------------------------------------------------------------


class Usage(PerqModel):
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
        )
