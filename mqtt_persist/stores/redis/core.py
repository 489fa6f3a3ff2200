"""The Redis store's core: configuration, the connection and scripts, the guarded session call.

Every script call that changes a session goes through ``RedisStoreCore._session_call``: it passes
the lease's fencing token, maps the script's refusals to typed errors (fenced, locked, damaged,
newer format) and quarantines damage it finds (``_quarantine``). ``store.RedisStore`` is the
facade; the key layout and the guarantees are in ``store``'s module documentation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mqtt_persist.errors import (
    InvalidInput,
    SessionCorrupt,
    SessionLocked,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.stores._cancellation import keep_cancellation
from mqtt_persist.stores._owners import describe_owner, fenced_error
from mqtt_persist.stores._quarantine import quarantine_stamp
from mqtt_persist.stores.base import StoreContext
from mqtt_persist.stores.redis.keys import (
    NAMES,
    KeyLayout,
    Keys,
    id_bytes,
    text,
)
from mqtt_persist.stores.redis.lease import LeaseKeeper
from mqtt_persist.stores.redis.scripts import Scripts
from mqtt_persist.stores.redis.server import (
    FORMAT_VERSION,
    MIGRATIONS,
    describe_client,
    redact,
)

logger = logging.getLogger(__name__)


class RedisStoreCore(StoreContext):
    """Configuration, connection, scripts and the guarded session call of a :class:`RedisStore`."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "mqtt_persist",
        clock: Callable[[], float] = time.time,
        lease_ttl: float = 15.0,
        takeover: bool = False,
        client: Redis | None = None,
    ) -> None:
        """Configure the store; nothing connects before :meth:`open` (or the first call)."""
        if not prefix:
            raise InvalidInput("the key prefix must not be empty")
        if not (isinstance(lease_ttl, int | float) and math.isfinite(lease_ttl) and lease_ttl > 0):
            raise InvalidInput(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        if client is not None and client.connection_pool.connection_kwargs.get("decode_responses"):
            raise InvalidInput("RedisStore needs a client made with decode_responses=False")
        self._url = url
        self._safe_url = redact(url) if client is None else describe_client(client)
        self._prefix = prefix
        self._layout = KeyLayout(prefix)
        self._clock = clock
        self._lease_ttl = float(lease_ttl)
        self._takeover = takeover
        #: Writes refused because a newer owner took the session over (SessionFenced).
        self.fenced_writes = 0
        self._given_client = client
        self._client: Redis | None = None
        self._scripts: Scripts | None = None
        self._leases = LeaseKeeper(
            self._layout, self._lease_ttl, uuid.uuid4().hex, self._errors, prefix
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._open_lock = asyncio.Lock()

    def __repr__(self) -> str:
        """Shows the URL without its password."""
        return f"RedisStore({self._safe_url!r}, prefix={self._prefix!r})"

    @property
    def url(self) -> str:
        """The server's URL with any password replaced by ``***`` (safe to log)."""
        return self._safe_url

    @property
    def prefix(self) -> str:
        """The prefix of every key this store uses."""
        return self._prefix

    # --- plumbing -------------------------------------------------------------------------------

    def session_keys(self, client_id: str) -> dict[str, bytes]:
        """The Redis keys of ``client_id``'s session by name (meta, msg, ..., lease)."""
        keys = self._keys(client_id)
        return {name: getattr(keys, name) for name in (*NAMES, "lease")}

    def _keys(self, client_id: str) -> Keys:
        return self._layout.session(client_id)

    def _lock_for(self, client_id: str) -> asyncio.Lock:
        # Calls for one session run in call order, as one client issues them (a batch after
        # the one it follows), even though the connection pool could reorder them.
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        return lock

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Report Redis' failures as the store's (without the URL's password)."""
        try:
            yield
        except RedisError as exc:
            raise StoreError(f"redis at {self._safe_url} failed: {exc}") from exc

    async def _ready(self) -> tuple[Redis, Scripts]:
        if self._client is None or self._scripts is None:
            await self.open()
        assert self._client is not None and self._scripts is not None
        return self._client, self._scripts

    async def _eval(self, script: AsyncScript, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        with self._errors():
            return await keep_cancellation(script(keys=keys, args=args))

    def _token(self, client_id: str) -> bytes:
        return self._leases.token(client_id)

    def _now(self) -> bytes:
        # repr() round-trips a float exactly; Lua's tonumber reads it back to the same double.
        return repr(float(self._clock())).encode()

    async def _session_call(
        self, client_id: str, pick: Callable[[Scripts], AsyncScript], tail: Sequence[Any]
    ) -> list[Any]:
        """Run a session script; refusals become exceptions, older formats are migrated first."""
        _, scripts = await self._ready()
        keys = self._keys(client_id)
        migrated_from: set[bytes] = set()
        while True:
            args = [self._token(client_id), self._now(), FORMAT_VERSION, id_bytes(client_id)]
            reply = await self._eval(pick(scripts), keys.script, [*args, *tail])
            if reply[0] != b"version":
                return await self._checked(client_id, keys, reply)
            version_raw = reply[1]
            version = int(version_raw)
            if version > FORMAT_VERSION:
                raise UnsupportedFormatVersion(
                    f"session {client_id!r} was written in format version {version}, newer "
                    f"than this library's {FORMAT_VERSION}; left in place",
                    location=text(keys.meta),
                )
            migration = MIGRATIONS.get(version)
            if migration is None or version_raw in migrated_from:
                reason = (
                    f"format version {version} is not one this library ever wrote"
                    if migration is None
                    else f"the migration from format version {version} did not advance it"
                )
                raise await self._quarantine(client_id, keys, keys.meta, reason)
            migrated_from.add(version_raw)
            await self._checked(
                client_id, keys, await self._eval(migration(scripts), keys.script, args)
            )

    async def _checked(self, client_id: str, keys: Keys, reply: list[Any]) -> list[Any]:
        status = reply[0]
        if status == b"locked":
            raise SessionLocked(
                f"session {client_id!r} is held by {describe_owner(reply[1])} "
                f"(lease key {text(keys.lease)})"
            )
        if status == b"fenced":
            self._leases.mark_lost(client_id)  # acquire may take it again
            self.fenced_writes += 1
            ours = self._token(client_id).decode() or "none"
            raise fenced_error(client_id, ours, text(reply[2]), reply[1], self._lease_ttl)
        if status == b"corrupt":
            raise await self._quarantine(client_id, keys, reply[1], text(reply[2]))
        if status == b"badkey":
            raise SessionCorrupt(text(reply[2]), location=text(reply[1]))
        return reply

    async def _quarantine(
        self, client_id: str, keys: Keys, key: bytes, reason: str
    ) -> SessionCorrupt:
        """Move the session's keys aside (RENAME + PERSIST); the error to raise, naming both."""
        _, scripts = await self._ready()
        stamp = quarantine_stamp().encode()
        location = text(key)
        for attempt in range(100):
            suffix = stamp if attempt == 0 else stamp + b"-%d" % attempt
            base, targets = self._layout.quarantine(suffix, client_id)
            try:
                reply = await self._eval(
                    scripts.quarantine,
                    [*keys.script, *targets],
                    [self._token(client_id), id_bytes(client_id)],
                )
            except StoreError as exc:
                logger.error(
                    "damaged session %r (%s: %s) not moved aside: %s",
                    client_id,
                    location,
                    reason,
                    exc,
                )
                return SessionCorrupt(f"{reason}; moving it aside failed: {exc}", location=location)
            if reply[0] == b"taken":
                continue
            if reply[0] == b"locked":
                holder = describe_owner(reply[1])
                return SessionCorrupt(
                    f"{reason}; not moved aside while {holder} holds the session",
                    location=location,
                )
            moved_to = text(base) + ":*"
            logger.error(
                "damaged session %r (%s: %s) moved to %s", client_id, location, reason, moved_to
            )
            return SessionCorrupt(reason, location=location, quarantined_to=moved_to)
        return SessionCorrupt(f"{reason}; no free quarantine name", location=location)
