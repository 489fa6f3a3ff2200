"""RedisStore's Lua scripts, loaded from the ``scripts/*.lua`` files shipped with the package.

Each session script is ``prelude.lua`` (the helpers every one of them needs: key types, meta,
the lease check, expiry) followed by its own file; the lease and format scripts stand alone.

Atomicity
    Every call that writes runs ONE Lua script (EVALSHA): Redis runs a script alone and whole,
    so a client killed at any point leaves all of a batch or none of it. Lua rather than
    MULTI/EXEC because operations are conditional (``PacketIdAssigned`` only applies to a
    stored message, ``MessageAdded`` only when the sequence number is new), which a
    transaction could only express with WATCH and a read round trip per batch. Redis does not
    roll back a script that fails half way, so each script checks everything that could make
    a later command fail (key types, meta fields, the lease) before its first write; the
    Python side validates every operation before sending anything.

Cost
    A script runs alone: Redis serves nobody else meanwhile. ``apply`` costs a few dozen
    microseconds of Redis time plus its operations; ``load(queued_limit=n)`` reads the
    in-flight messages and n queued ones whatever the queue's length. A full load
    (``queued_limit=None``) by the lease holder reads the queue in pages of 1000 (one short
    script each; nobody else can write meanwhile); without the lease it is ONE script, which
    for a huge queue keeps Redis busy for a while (about half a second per 100k messages).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

__all__ = ["SESSION_SCRIPTS", "STANDALONE_SCRIPTS", "Scripts", "source"]

#: Scripts that work on one session (KEYS: the session keys, lease, index keys).
SESSION_SCRIPTS = (
    "apply",
    "touch",
    "load",
    "read_queued",
    "save",
    "update_ttl",
    "delete",
    "cleanup_one",
    "quarantine",
    "migrate_1",
)
#: Scripts with keys of their own.
STANDALONE_SCRIPTS = (
    "lease_acquire",
    "lease_renew",
    "lease_release",
    "lease_abandon",
    "format",
)


@cache
def source(name: str) -> str:
    """The Lua source of script ``name`` as Redis runs it (with the prelude if it needs one)."""
    folder = resources.files(__package__).joinpath("scripts")
    text = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in SESSION_SCRIPTS:
        text = folder.joinpath("prelude.lua").read_text(encoding="utf-8") + "\n" + text
    return text


@dataclass(slots=True)
class Scripts:
    """Every script, registered with one client (EVALSHA, loaded on first use)."""

    apply: AsyncScript
    touch: AsyncScript
    load: AsyncScript
    read_queued: AsyncScript
    save: AsyncScript
    update_ttl: AsyncScript
    delete: AsyncScript
    cleanup_one: AsyncScript
    quarantine: AsyncScript
    migrate_1: AsyncScript
    lease_acquire: AsyncScript
    lease_renew: AsyncScript
    lease_release: AsyncScript
    lease_abandon: AsyncScript
    format: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        """Register every script with ``client``."""
        names = SESSION_SCRIPTS + STANDALONE_SCRIPTS
        return cls(**{name: client.register_script(source(name)) for name in names})
