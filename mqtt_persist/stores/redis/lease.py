"""RedisStore's leases: ``P:lease:ID`` keys renewed in the background, fenced by tokens.

A lease is the key ``P:lease:ID`` (the owner's JSON, ``PX lease_ttl``) plus the session's
fencing token ``P:fence:ID``: :meth:`LeaseKeeper.acquire` runs ``lease_acquire.lua``, which
takes the lease when it is free (absent: released, or lapsed: Redis expired the key), when its
holder is a process of THIS host that no longer runs (``_owners.owner_is_dead``; taken over at
once), or when asked to (``takeover=True``), and gives every new owner a new token from the
prefix's counter ``P:fencing`` (INCR: tokens only grow), written to ``P:fence:ID``. A holder
elsewhere (or one we cannot check) blocks until its lease lapses, at most ``lease_ttl`` after
it stopped renewing, by Redis' own clock (PX).

The token travels with every call that writes: ``lease_refusal`` in ``prelude.lua`` compares it
with ``P:fence:ID`` inside the writing script, so a former owner's write is refused
(:class:`~mqtt_persist.errors.SessionFenced`) from the moment a new owner took over, and so is a
write after our lease lapsed (the key expired before a renewal, every ``lease_ttl / 3``,
``lease_renew.lua``, extended it): a lapsed lease is never renewed, the store must acquire
again, so a paused owner never races a rival that saw the lapse.
:meth:`LeaseKeeper.release` deletes the lease if it is ours and the fence if it holds our token.
An acquire cancelled in its round trip runs ``lease_abandon.lua``: the script may have run,
so the lease goes if it holds that attempt's owner value (which names the moment it was made).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from mqtt_persist.errors import SessionLocked, StoreError
from mqtt_persist.stores._cancellation import keep_cancellation
from mqtt_persist.stores._owners import describe_owner, owner_is_dead, owner_value
from mqtt_persist.stores._renewed_leases import RenewedLeases
from mqtt_persist.stores.redis.keys import KeyLayout, text
from mqtt_persist.stores.redis.scripts import Scripts

__all__ = ["LeaseKeeper", "TokenLease"]

logger = logging.getLogger(__name__)

#: The store's context manager that reports Redis' failures as StoreError.
Errors = Callable[[], contextlib.AbstractContextManager[None]]


@dataclass(slots=True)
class TokenLease:
    """A lease this store holds: its fencing token (decimal) and the owner value it wrote."""

    token: bytes
    owner: bytes
    #: A newer owner took it over (seen by a renewal or a refused write).
    lost: bool = False


class LeaseKeeper(RenewedLeases[TokenLease]):
    """The leases one RedisStore holds, and the task that renews them."""

    owner_kind = "RedisStore"

    def __init__(
        self, layout: KeyLayout, lease_ttl: float, store_id: str, errors: Errors, name: str
    ) -> None:
        """Leases under ``layout``, ``lease_ttl`` seconds each; ``errors`` reports failures."""
        super().__init__(lease_ttl, name)
        self._layout = layout
        self._lease_ms = max(1, math.ceil(lease_ttl * 1000))
        self._store_id = store_id
        self._errors = errors
        #: The scripts to renew with (set by the store when connected; None: not connected).
        self.scripts: Scripts | None = None

    def token(self, client_id: str) -> bytes:
        """Our fencing token for ``client_id`` (b'' when we hold no lease: scripts then only
        check that nobody else holds one)."""
        lease = self._held.get(client_id)
        return b"" if lease is None else lease.token

    def _keys(self, client_id: str) -> list[bytes]:
        keys = self._layout.session(client_id)
        return [keys.lease, keys.fence]

    async def acquire(
        self, client_id: str, client: Redis, scripts: Scripts, *, takeover: bool
    ) -> None:
        """Take the lease; SessionLocked, naming the holder, when another owner holds it."""
        self._check_free(client_id)
        keys = [*self._keys(client_id), self._layout.fencing]
        owner = owner_value(self._store_id)
        dead = b""
        for _ in range(5):
            try:
                reply = await self._run(
                    scripts.lease_acquire,
                    keys,
                    [owner, self._lease_ms, b"1" if takeover else b"0", dead],
                )
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled: the script may have run
                    await self._undo_cancelled(
                        client_id, lambda: self._run(scripts.lease_abandon, keys[:2], [owner])
                    )
                raise
            if reply[0] == b"ok":
                break
            holder = reply[1]
            if not owner_is_dead(holder):
                raise SessionLocked(
                    f"session {client_id!r} is held by {describe_owner(holder)} "
                    f"(lease key {text(keys[0])})"
                )
            dead = holder
        else:
            raise SessionLocked(f"session {client_id!r}: its lease keeps changing hands")
        if dead:
            logger.warning(
                "took over the lease of session %r from %s, which no longer runs",
                client_id,
                describe_owner(dead),
            )
        self._hold(client_id, TokenLease(reply[1], owner))

    async def _run(self, script: AsyncScript, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        with self._errors():
            return await keep_cancellation(script(keys=keys, args=args))

    async def _give_back(self, client_id: str, lease: TokenLease) -> None:
        """Delete the lease if it is ours and the fence if it holds our token."""
        if self.scripts is not None:  # not connected: the lease lapses by itself
            await self._run(
                self.scripts.lease_release, self._keys(client_id), [lease.token, lease.owner]
            )

    async def renew(self) -> None:
        """Extend every held lease (set it again if it lapsed); mark those taken over."""
        if self.scripts is None:
            return
        for client_id, lease in list(self._held.items()):
            if lease.lost:
                continue
            try:
                renewed = await self._run(
                    self.scripts.lease_renew,
                    self._keys(client_id),
                    [lease.token, lease.owner, self._lease_ms],
                )
            except StoreError as exc:
                # Try again next round: the lease survives until lease_ttl runs out, and even
                # then stays ours unless somebody takes it over.
                logger.warning("could not renew the lease of session %r: %s", client_id, exc)
                continue
            if not renewed:
                self._taken_over(client_id, lease)
