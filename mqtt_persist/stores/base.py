"""The contract every session store keeps.

The client never reads or writes session data except through this protocol, so a new medium
(SQLite, Redis, ...) plugs in without the client changing. The write path is
:meth:`SessionStore.apply`: the client hands over the operations of one event-loop burst and sends
the packets they protect only after ``apply`` returned (write-ahead). ``apply`` must therefore be
durable when it returns (as durable as the store promises: a MemoryStore survives nothing but a
client restart inside one process) and atomic: after a crash at any point, a later ``load`` sees
either all of a batch or none of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from mqtt_persist.session.state import Operation, SessionState, StoredMessage


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One stored session, as :meth:`SessionStore.list_sessions` reports it."""

    client_id: str
    #: Unix timestamps.
    created_at: float
    last_access: float
    #: None when the session never expires.
    expires_at: float | None
    #: QoS 1/2 messages that reached the in-flight window (have a packet ID).
    inflight: int
    #: QoS 1/2 messages still waiting for the window.
    queued: int
    #: Messages set aside (poison messages), kept until discarded.
    set_aside: int = 0


@runtime_checkable
class SessionStore(Protocol):
    """Async storage of client sessions. Every method is safe to call from concurrent tasks."""

    #: True when a committed :meth:`apply` survives the process (a crash, a power cut with
    #: fsync). ``publish()`` waits for the commit only then; a store that keeps nothing beyond
    #: the process (MemoryStore) says False and saves every publish that wait.
    durable: bool

    async def open(self) -> None:
        """Prepare the medium (create directories, connect). Idempotent."""

    async def close(self) -> None:
        """Release every lease this store holds and close the medium. Idempotent."""

    async def acquire(self, client_id: str) -> None:
        """Take the ownership lease of ``client_id``'s session.

        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process (or another
        client in this process) holds it, so two clients never drive one stored session.
        """

    async def release(self, client_id: str) -> None:
        """Give the lease back. Idempotent."""

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """The stored session, or None when there is none.

        With ``queued_limit``, at most that many *queued* messages (no packet ID yet) are
        included: those with the lowest sequence numbers. In-flight messages (with a packet ID)
        and set-aside messages (``state.set_aside``, few by nature) are always included.
        ``state.queued_not_loaded`` then counts the queued messages left in the store, and
        ``state.last_seq`` is the highest sequence number stored either way, so a client's
        memory grows with its in-flight window, not with its queue.

        Raises :class:`~mqtt_persist.errors.SessionExpired` for an expired session (which is
        then removed) and :class:`~mqtt_persist.errors.SessionCorrupt` for unreadable data
        (which is moved aside, never deleted).
        """

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages (no packet ID) with ``seq > after_seq``, ascending, at most ``limit``.

        Reflects every committed :meth:`apply` (read-after-write). An unknown session gives [].
        It counts as an access of the session (like :meth:`apply`, it does not check expiry:
        the caller holds the session's lease).
        """

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot, atomically.

        The snapshot is the whole session: queued messages it does not contain (for example
        those a ``queued_limit`` load left in the store) are gone afterwards. The client never
        calls it (its journal is always complete); it is for tools and migrations.
        """

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Append operations to the session's journal: durable and atomic when it returns."""

    async def delete(self, client_id: str) -> None:
        """Remove the stored session. Idempotent; a missing session is not an error."""

    async def exists(self, client_id: str) -> bool:
        """True when a (non-expired) session is stored for ``client_id``."""

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included until :meth:`cleanup_expired` runs."""

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never)."""

    async def cleanup_expired(self) -> int:
        """Remove every expired session; returns how many were removed."""


@runtime_checkable
class StartsCommits(Protocol):
    """What a store may add to :class:`SessionStore`: a commit started without an ``await``.

    Optional. A store that has it lets a one-at-a-time ``publish()`` commit from the caller's
    own task, with no hop through the client's flusher task (FileStore, MemoryStore). The
    write-ahead rule is unchanged: the client sends the batch's packets only once ``durable``
    resolved without an error. The client uses ``begin_apply`` only where it belongs with
    ``apply``: a subclass (or a wrapper set on an instance) that replaces ``apply`` alone keeps
    every commit on its ``apply``.
    """

    def begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        """Start :meth:`SessionStore.apply` of ``ops`` now, on the event loop, without awaiting.

        True: the batch is written and ``durable`` resolves once it is as durable as
        ``apply`` would have made it (it may be resolved already), or gets the
        :class:`~mqtt_persist.errors.StoreError` that ``apply`` would have raised. False:
        nothing was done and ``durable`` is untouched (this batch needs ``apply``: for
        example the session's first, or one that compacts the journal). Raises what ``apply``
        raises for a batch it refuses outright; nothing of it is stored then. ``ops`` is not
        empty, and the store must not cancel ``durable``.
        """
        ...


class StoreContext:
    """``async with store``: :meth:`open` on entry, :meth:`close` on exit (leases released,
    sessions kept). The stores in this package inherit it."""

    async def open(self) -> None:
        """Prepare the medium (overridden by every store)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the medium (overridden by every store)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        """Open the store and return it."""
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the store (its leases are released; its sessions stay)."""
        await self.close()
