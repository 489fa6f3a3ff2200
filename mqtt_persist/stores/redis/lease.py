"""RedisStore's leases: ``SET NX PX`` keys, renewed in the background, taken over from the dead.

:meth:`LeaseKeeper.acquire` is ``SET P:lease:ID <owner> NX PX lease_ttl``; a background task
renews every held lease each ``lease_ttl / 3`` with a compare-and-PEXPIRE, and
:meth:`LeaseKeeper.release` deletes it only if it is still ours (compare-and-delete). When the
lease is held by a process on THIS host that no longer runs (``owners.owner_is_dead``),
``acquire`` takes it over at once with an atomic compare-and-set; a holder elsewhere (or one we
cannot check) blocks until its lease expires, at most ``lease_ttl`` after it stopped renewing.

The session scripts check the lease themselves before they write (``lease_refusal`` in
``prelude.lua``): the token this keeper holds travels with every call, and a store whose lease
was lost (renewal did not run for ``lease_ttl``, e.g. a stalled event loop) is refused until it
acquires again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from mqtt_persist.errors import SessionLocked, StoreError
from mqtt_persist.stores._owners import describe_owner, identity, owner_is_dead
from mqtt_persist.stores.redis.keys import KeyLayout, text
from mqtt_persist.stores.redis.scripts import Scripts

__all__ = ["LeaseKeeper", "TokenLease"]

logger = logging.getLogger(__name__)

#: The store's context manager that reports Redis' failures as StoreError.
Errors = Callable[[], contextlib.AbstractContextManager[None]]


@dataclass(slots=True)
class TokenLease:
    """A lease this store holds: its owner value (the token scripts compare)."""

    token: bytes
    #: The lease expired or was taken over while we held it; writes are refused until release.
    lost: bool = False


class LeaseKeeper:
    """The leases one RedisStore holds, and the task that renews them."""

    def __init__(
        self, layout: KeyLayout, lease_ttl: float, store_id: str, errors: Errors, name: str
    ) -> None:
        """Leases under ``layout``, ``lease_ttl`` seconds each; ``errors`` reports failures."""
        self._layout = layout
        self._lease_ttl = lease_ttl
        self._lease_ms = max(1, math.ceil(lease_ttl * 1000))
        self._store_id = store_id
        self._errors = errors
        self._name = name
        self._held: dict[str, TokenLease] = {}
        self._renewal: asyncio.Task[None] | None = None
        #: The scripts to renew with (set by the store when connected; None: not connected).
        self.scripts: Scripts | None = None

    def token(self, client_id: str) -> bytes:
        """Our token for ``client_id`` (b'' when we hold no lease: scripts then check none)."""
        lease = self._held.get(client_id)
        return b"" if lease is None else lease.token

    def holds(self, client_id: str) -> bool:
        """True while we hold the lease and have not seen it lost."""
        lease = self._held.get(client_id)
        return lease is not None and not lease.lost

    def mark_lost(self, client_id: str) -> None:
        """A script found our lease gone or taken: writes are refused until acquired again."""
        if (lease := self._held.get(client_id)) is not None:
            lease.lost = True

    def _owner_value(self) -> bytes:
        owner = identity()
        owner["store"] = self._store_id
        owner["since"] = round(time.time(), 3)
        return json.dumps(owner, sort_keys=True).encode()

    async def acquire(self, client_id: str, client: Redis, scripts: Scripts) -> None:
        """Take the lease; SessionLocked, naming the holder, when another owner holds it."""
        held = self._held.get(client_id)
        if held is not None and not held.lost:
            raise SessionLocked(f"session {client_id!r} is already acquired by this store")
        key = self._layout.session(client_id).lease
        token = self._owner_value()
        for _ in range(5):
            with self._errors():
                if await client.set(key, token, nx=True, px=self._lease_ms):
                    break
                holder = typing.cast(bytes | None, await client.get(key))
            if holder is None:
                continue  # it expired just now: try again
            if held is not None and holder == held.token:
                token = holder  # our lost lease is back in our name (renewal caught up)
                break
            if not owner_is_dead(holder):
                raise SessionLocked(
                    f"session {client_id!r} is held by {describe_owner(holder)} "
                    f"(lease key {text(key)})"
                )
            if await self._run(scripts.lease_takeover, [key], [holder, token, self._lease_ms]):
                logger.warning(
                    "took over the lease of session %r from %s, which no longer runs",
                    client_id,
                    describe_owner(holder),
                )
                break
        else:
            raise SessionLocked(f"session {client_id!r}: its lease keeps changing hands")
        self._held[client_id] = TokenLease(token)
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"RedisStore lease renewal ({self._name})"
            )

    async def _run(self, script: AsyncScript, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        with self._errors():
            return await script(keys=keys, args=args)

    async def release(self, client_id: str) -> None:
        """Give the lease back if we still hold it (compare-and-delete). Idempotent."""
        lease = self._held.pop(client_id, None)
        if not self._held:
            await self.stop_renewal()
        if lease is not None and self.scripts is not None:
            key = self._layout.session(client_id).lease
            await self._run(self.scripts.lease_release, [key], [lease.token])

    async def release_all(self) -> None:
        """Stop renewing and release every lease; one that cannot be released is logged and
        left to expire within ``lease_ttl``."""
        await self.stop_renewal()
        held, self._held = self._held, {}
        if self.scripts is None:
            return
        for client_id, lease in held.items():
            key = self._layout.session(client_id).lease
            try:
                await self._run(self.scripts.lease_release, [key], [lease.token])
            except StoreError as exc:
                logger.warning("could not release the lease of session %r: %s", client_id, exc)

    async def stop_renewal(self) -> None:
        """Stop the renewal task (leases then lapse after ``lease_ttl``)."""
        task, self._renewal = self._renewal, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew_forever(self) -> None:
        interval = self._lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            if self.scripts is None:
                continue
            for client_id, lease in list(self._held.items()):
                if lease.lost:
                    continue
                key = self._layout.session(client_id).lease
                try:
                    renewed = await self._run(
                        self.scripts.lease_renew, [key], [lease.token, self._lease_ms]
                    )
                except StoreError as exc:
                    # Try again next round: the lease survives until lease_ttl runs out.
                    logger.warning("could not renew the lease of session %r: %s", client_id, exc)
                    continue
                if not renewed and self._held.get(client_id) is lease:
                    lease.lost = True
                    logger.error(
                        "lost the lease of session %r (it expired before renewal); writes to "
                        "it are refused until it is acquired again",
                        client_id,
                    )
