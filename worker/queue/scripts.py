"""The worker's Lua scripts: read from their `.lua` files once, run by SHA1, loaded into Redis on demand.

Lua is used where a transaction cannot say it in one round trip: taking several ready steps
(`pick_up.lua`), renewing or dropping only this worker's leases (`renew.lua`, `drop.lua`), and the
hand-over's enqueue that refuses a cancelled job (`enqueue.lua`); and where one call does the work of
several commands on a step's hot path (`publish.lua`: a step's events, and its finish). redis-py's
registered Script would do the loading too, but inside a pipeline it adds a SCRIPT EXISTS round trip to
every `execute()`; here a pipeline sends EVALSHA only, and a Redis that does not know the script
(restarted, flushed, failed over) gets it loaded and only the refused calls run again, which keeps the
hand-over one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from worker.queue.batch import Batches, Commands

Arg = str | bytes | int | float
PACKAGE = __name__.rpartition(".")[0]  # the .lua files sit beside this module


class LuaScript:
    """One script of this package, by the name of its `.lua` file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.body = resources.files(PACKAGE).joinpath(f"{name}.lua").read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()

    async def __call__(self, redis: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run it: one round trip, two more the first time a Redis sees it."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.body)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    def add_to(self, pipe: Any, keys: Sequence[str], args: Sequence[Arg], calls: list[ScriptCall]) -> None:
        """Add a call to a pipeline; `calls` remembers it for `settle`."""
        calls.append(ScriptCall(self, len(pipe), tuple(keys), tuple(args)))
        pipe.evalsha(self.sha, len(keys), *keys, *args)


async def settle(
    redis: Any, batches: Batches, replies: list[Any], calls: list[ScriptCall], *, raising: bool = True
) -> list[Any]:
    """The replies of a batch (`batches`, which return errors as replies), with the script calls (`calls`,
    of any scripts) that Redis refused for not knowing their script run again once it is loaded (a refused
    call did nothing, the rest of the batch ran once), through the same batches, so that what their caller
    asks next still runs after them. Then, like `execute()`, the first error left is raised, unless not
    `raising`: then the caller looks at each error in `replies` itself."""
    unknown = [c for c in calls if isinstance(replies[c.position], NoScriptError)]
    if unknown:
        for script in {id(c.script): c.script for c in unknown}.values():
            await redis.script_load(script.body)
        again_calls = Commands()
        for c in unknown:
            again_calls.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
        again = await batches.send(again_calls)
        for c, reply in zip(unknown, again, strict=True):
            replies[c.position] = reply
    for reply in replies if raising else ():
        if isinstance(reply, Exception):
            raise reply
    return replies


class ScriptCall:
    """A script call queued in a pipeline: where its reply is, and what to run again if Redis lacked it."""

    __slots__ = ("args", "keys", "position", "script")

    def __init__(
        self, script: LuaScript, position: int, keys: tuple[str, ...], args: tuple[Arg, ...]
    ) -> None:
        self.script = script
        self.position = position
        self.keys = keys
        self.args = args


PICK_UP = LuaScript("pick_up")
RENEW = LuaScript("renew")
ENQUEUE = LuaScript("enqueue")
DROP = LuaScript("drop")
PUBLISH = LuaScript("publish")
SCRIPTS = (PICK_UP, RENEW, ENQUEUE, DROP, PUBLISH)


async def load_scripts(redis: Any) -> None:
    """Load every script into Redis (a worker does at start). Why: a hand-over's pipeline runs the events'
    call (`publish.lua`) before the enqueues (`enqueue.lua`); a Redis that knew only the latter (loaded by a
    worker of an earlier release) would enqueue the next step and refuse the events, which `settle` then
    publishes a round trip later. A Redis that forgot every script (restarted, flushed) refuses them all,
    and `settle` runs them again in order."""
    async with redis.pipeline(transaction=False) as pipe:
        for script in SCRIPTS:
            pipe.script_load(script.body)
        await pipe.execute()
