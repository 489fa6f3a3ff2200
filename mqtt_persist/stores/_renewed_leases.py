"""What the shared stores' leases have in common: held in memory, renewed by a background task.

RedisStore and PostgresStore both fence a session with a lease that lapses unless renewed
(``lease_ttl``) and carries a fencing token. How a lease is taken, renewed and given back is
each server's own (a Lua script, an SQL statement); what surrounds that is the same and lives
here: the leases held, the one renewal task (every ``lease_ttl / 3``, started by the first
lease and stopped with the last), releasing them all on close, what a lease found taken
over means (writes to it are refused until it is acquired again), and taking back a lease that
a cancelled acquire may have been granted (:meth:`RenewedLeases._undo_cancelled`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import anyio

from mqtt_persist.errors import SessionLocked, StoreError

__all__ = ["HeldLease", "RenewedLeases"]

logger = logging.getLogger(__name__)


class HeldLease(Protocol):
    """A lease a store holds; ``lost`` once a newer owner took it over."""

    lost: bool


LeaseT = TypeVar("LeaseT", bound=HeldLease)

#: Seconds a cancelled acquire may spend taking back the lease it may have been granted; past
#: that the lease is left to lapse (``lease_ttl``), as before.
UNDO_BOUND = 2.0


class RenewedLeases(Generic[LeaseT]):
    """The leases one store holds, and the task that renews them.

    A subclass says how one lease is renewed (:meth:`renew`) and given back
    (:meth:`_give_back`), and calls :meth:`_check_free` and :meth:`_hold` around taking one.
    """

    #: Names the renewal task (seen in task dumps), e.g. ``"RedisStore"``.
    owner_kind = "store"

    def __init__(self, lease_ttl: float, name: str) -> None:
        """Leases of ``lease_ttl`` seconds; ``name`` names this store in the renewal task."""
        self._lease_ttl = lease_ttl
        self._name = name
        self._held: dict[str, LeaseT] = {}
        self._renewal: asyncio.Task[None] | None = None

    def holds(self, client_id: str) -> bool:
        """True while we hold the lease and have not seen it taken over."""
        lease = self._held.get(client_id)
        return lease is not None and not lease.lost

    def mark_lost(self, client_id: str) -> None:
        """A write found our token outdated: acquire may take the lease again."""
        if (lease := self._held.get(client_id)) is not None:
            lease.lost = True

    async def release(self, client_id: str) -> None:
        """Give the lease back if it is still ours. Idempotent."""
        lease = self._held.pop(client_id, None)
        if not self._held:
            await self.stop_renewal()
        if lease is not None:
            await self._give_back(client_id, lease)

    async def release_all(self) -> None:
        """Stop renewing and release every lease; one that cannot be released is logged and
        left to lapse within ``lease_ttl``."""
        await self.stop_renewal()
        held, self._held = self._held, {}
        for client_id, lease in held.items():
            try:
                await self._give_back(client_id, lease)
            except StoreError as exc:
                logger.warning("could not release the lease of session %r: %s", client_id, exc)

    async def stop_renewal(self) -> None:
        """Stop the renewal task (leases then lapse after ``lease_ttl``)."""
        task, self._renewal = self._renewal, None
        if task is not None and not task.done():
            task.cancel()
            # Bounded: a driver may swallow the cancellation of a call in flight (seen with
            # redis-py, before keep_cancellation); the loop then ends by itself at its next
            # turn (it is no longer the renewal task), and a close must not wait for that.
            await asyncio.wait({task}, timeout=1.0)

    async def renew(self) -> None:
        """Extend every held lease; mark those taken over (:meth:`_taken_over`)."""
        raise NotImplementedError

    async def _give_back(self, client_id: str, lease: LeaseT) -> None:
        """Delete the lease on the server if it is still ours (compare-and-delete)."""
        raise NotImplementedError

    def _check_free(self, client_id: str) -> None:
        """Before taking a lease: refuse a second acquire of one we hold."""
        held = self._held.get(client_id)
        if held is not None and not held.lost:
            raise SessionLocked(f"session {client_id!r} is already acquired by this store")

    async def _undo_cancelled(self, client_id: str, undo: Callable[[], Awaitable[object]]) -> None:
        """An acquire was cancelled after its request may have reached the server: take back
        the lease it may have been granted, shielded from the cancellation, within
        :data:`UNDO_BOUND` seconds.

        The server may have written the lease before the reply was lost; this store then does
        not know it holds it, and the session stays locked, even for a restarted client of
        the same id, until the lease lapses after ``lease_ttl``. ``undo`` deletes the lease only
        if it carries the owner value of this very attempt, so it never touches anybody
        else's. Failing or too slow, it is logged and the lease lapses as before.
        """
        with anyio.move_on_after(UNDO_BOUND, shield=True) as scope:
            try:
                await undo()
            except Exception as exc:
                logger.warning(
                    "a cancelled acquire of session %r could not take back its lease (left to "
                    "lapse): %s",
                    client_id,
                    exc,
                )
        if scope.cancelled_caught:
            logger.warning(
                "a cancelled acquire of session %r could not take back its lease within %.0f s "
                "(left to lapse)",
                client_id,
                UNDO_BOUND,
            )

    def _hold(self, client_id: str, lease: LeaseT) -> None:
        """A lease was taken: keep it, and renew it from now on."""
        self._held[client_id] = lease
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"{self.owner_kind} lease renewal ({self._name})"
            )

    def _taken_over(self, client_id: str, lease: LeaseT) -> None:
        """A renewal found ``lease`` no longer ours (unless it was released meanwhile)."""
        if self._held.get(client_id) is lease:
            lease.lost = True
            logger.error(
                "session %r was taken over by another owner; writes to it are refused "
                "(fenced) until it is acquired again",
                client_id,
            )

    async def _renew_forever(self) -> None:
        interval = self._lease_ttl / 3
        me = asyncio.current_task()
        while self._renewal is me:
            await asyncio.sleep(interval)
            if self._renewal is not me:
                return
            try:
                await self.renew()
            except StoreError as exc:
                # Try again next round: the lease survives until lease_ttl runs out, and even
                # then stays ours unless somebody takes it over.
                logger.warning("could not renew leases: %s", exc)
