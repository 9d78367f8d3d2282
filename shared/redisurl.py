"""PERQ_REDIS_URL: a Redis URL (`redis://`, `rediss://`, `unix://`) or a Redis Sentinel address.

    redis+sentinel://[[username]:password@]host1:26379,host2:26379/mymaster[/db]

The Sentinel form is the one redis-py users know: the sentinels to ask, the name of the master they watch,
and the database. Clients ask a sentinel where the master is whenever they connect, so after a failover
the producer, the workers and the followers all follow the new master. The password is the master's;
sentinels are asked without one. `rediss+sentinel://` talks TLS to the master.

Plain parsing, no Redis client: the settings validator uses it for every command. arq's RedisSettings for a
URL are made in the queue room (`shared.queue.broker.redis_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


@dataclass(frozen=True)
class SentinelAddress:
    sentinels: list[tuple[str, int]]
    master: str
    database: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEMES)


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The parts of a Sentinel address; ValueError names what is wrong (the URL's password is never shown)."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (use {' or '.join(SENTINEL_SCHEMES)})")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    username, colon, password = userinfo.partition(":")
    if userinfo and not colon:  # redis-py reads a lone userinfo as the password
        username, password = "", userinfo
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "26379"
        host = host.strip("[]")
        if not host:
            raise ValueError("a Sentinel URL needs at least one sentinel, host:port, before the master name")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel {host!r} has an invalid port {port!r}")
        sentinels.append((host, int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("a Sentinel URL needs the master's name after the sentinels: .../mymaster/0")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"after the sentinels a Sentinel URL holds /master[/db], not /{'/'.join(parts)}")
    return SentinelAddress(
        sentinels=sentinels,
        master=unquote(parts[0]),
        database=int(parts[1]) if len(parts) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=scheme.startswith("rediss"),
    )


def check_redis_url(url: str) -> str:
    """The URL unchanged when perq can use it (a settings validator: a bad one stops every command)."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
    elif "://" in url and url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unknown scheme {url.split('://', 1)[0]!r}: use redis://, rediss://, unix:// or redis+sentinel://"
        )
    return url
