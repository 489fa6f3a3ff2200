"""The Redis server a RedisStore talks to: where it is, the format under the prefix, its policy.

``P:format`` holds the newest format version written under a prefix: a library older than the
data refuses it (:class:`~mqtt_persist.errors.UnsupportedFormatVersion`) and leaves it in
place, since in a shared Redis a newer library version may be using it; an older prefix is
raised to ours, and its sessions are upgraded one by one by :data:`MIGRATIONS` as they are used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from operator import attrgetter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from mqtt_persist.errors import SessionCorrupt, UnsupportedFormatVersion
from mqtt_persist.stores._cancellation import keep_cancellation
from mqtt_persist.stores.redis.keys import text
from mqtt_persist.stores.redis.scripts import Scripts

__all__ = [
    "FORMAT_VERSION",
    "MIGRATIONS",
    "check_prefix_format",
    "describe_client",
    "redact",
    "warn_if_evicting",
]

logger = logging.getLogger(__name__)

#: The key layout this module writes (``P:format`` and every session's ``meta.v``).
FORMAT_VERSION = 2

#: Upgrades of one session, keyed by the version they upgrade FROM: each picks the script that
#: rewrites the session's keys, atomically, and sets ``meta.v`` to a higher version. It runs
#: like every session script (KEYS: the session's; ARGV: lease token, now, format, client id)
#: and answers ``{'ok'}`` or a refusal (a lease another owner holds, damage), so it never
#: upgrades a session under a client that holds it.
MIGRATIONS: dict[int, Callable[[Scripts], AsyncScript]] = {1: attrgetter("migrate_1")}


async def check_prefix_format(scripts: Scripts, key: bytes, prefix: str) -> None:
    """Record our format version under the prefix, or refuse a newer one (or a damaged key)."""
    try:
        found = await keep_cancellation(scripts.format(keys=[key], args=[FORMAT_VERSION]))
    except ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise SessionCorrupt("not a string", location=text(key)) from exc
        raise
    if not (isinstance(found, bytes) and found.isdigit() and len(found) < 10):
        raise SessionCorrupt(f"{found!r} is not a format version", location=text(key))
    version = int(found)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatVersion(
            f"keys under prefix {prefix!r} were written in format version {version}, "
            f"newer than this library's {FORMAT_VERSION}",
            location=text(key),
        )
    if version < FORMAT_VERSION:
        logger.info(
            "prefix %r: format version %d raised to %d; sessions migrate as they are used",
            prefix,
            version,
            FORMAT_VERSION,
        )


async def warn_if_evicting(client: Redis) -> None:
    """Log a warning when the server may evict keys (session data) under memory pressure."""
    try:
        config: dict[Any, Any] = await keep_cancellation(client.config_get("maxmemory-policy"))
    except RedisError:
        return  # CONFIG is often disabled on managed servers: nothing to check then
    policy = config.get(b"maxmemory-policy", config.get("maxmemory-policy"))
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy and policy != "noeviction":
        logger.warning(
            "redis maxmemory-policy is %r: Redis may evict session data under memory "
            "pressure; use noeviction",
            policy,
        )


def describe_client(client: Redis) -> str:
    """Where a given client connects, built from its address only (never its credentials)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def redact(url: str) -> str:
    """The URL without its password (``redis://user:***@host``), for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable redis URL>"
