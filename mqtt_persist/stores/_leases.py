"""Ownership leases on ``flock``, and the expiry cleanup built on them (FileStore, SQLiteStore).

A lease is an exclusive ``flock`` on one lock file per client id, held until released; a
process that dies loses it with its file descriptors, so a SIGKILLed client's successor takes
over at once. A second holder, in this process or another, gets
:class:`~mqtt_persist.errors.SessionLocked`.

A lease is *explicit* when :meth:`FlockLeases.acquire` took it (a second ``acquire`` is
refused) and *implicit* when an operation that writes, or reads with intent to repair, took it
because the store did not hold it yet (:meth:`FlockLeases.ensure`): two processes then never
write one session, even when one of them never called ``acquire``. Either kind is kept until
``release``/``close``. Removals by ``delete`` and ``cleanup_expired`` hold it only for the
removal (:meth:`FlockLeases.during`).

Everything here blocks (open, flock, unlink): it runs on the store's worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from mqtt_persist.errors import SessionLocked
from mqtt_persist.stores._files import file_base, flock, unlock

__all__ = ["FlockLease", "FlockLeases", "remove_expired"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class FlockLease:
    """A held lease: the locked file's descriptor, and how it was taken."""

    fd: int
    #: Taken by acquire() (a second acquire is refused) rather than implicitly.
    explicit: bool


class FlockLeases:
    """The leases one store holds, as ``flock``-ed files ``<directory>/<file_base(id)>.lock``.

    ``has_session(client_id)`` says whether the session still has data: a lock file is removed
    (while still locked, see ``_files.flock``) when its lease is released and it has none, so
    lock files do not pile up for sessions that are gone.
    """

    def __init__(self, directory: str, has_session: Callable[[str], bool]) -> None:
        """Leases in ``directory`` (created 0700 on first use)."""
        self._directory = directory
        self._has_session = has_session
        self._held: dict[str, FlockLease] = {}

    def path(self, client_id: str) -> str:
        """The lock file of ``client_id``."""
        return os.path.join(self._directory, file_base(client_id) + ".lock")

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._held))

    def is_explicit(self, client_id: str) -> bool:
        """True when ``acquire`` took the lease: a client of this store drives the session."""
        lease = self._held.get(client_id)
        return lease is not None and lease.explicit

    def acquire(self, client_id: str) -> None:
        """The explicit lease; SessionLocked if another holder, or this store's acquire, has it."""
        lease = self._held.get(client_id)
        if lease is None:
            self._take(client_id, explicit=True)
        elif lease.explicit:
            raise SessionLocked(f"session {client_id!r} is already acquired by this store")
        else:
            lease.explicit = True

    def ensure(self, client_id: str) -> None:
        """Hold the lease (implicitly if not held yet); SessionLocked if another holder has it."""
        if client_id not in self._held:
            self._take(client_id, explicit=False)

    def release(self, client_id: str) -> None:
        """Give the lease back (if held). Idempotent."""
        lease = self._held.pop(client_id, None)
        if lease is not None:
            path = self.path(client_id)
            remove = False
            try:
                # A lock file without a session is litter; one with a session stays for next time.
                remove = not self._has_session(client_id)
            finally:
                unlock(lease.fd, path, remove)

    def release_all(self) -> None:
        """Release every lease; one that fails is logged and the others are still released."""
        for client_id in self:
            try:
                self.release(client_id)
            except OSError as exc:
                logger.error("releasing session %r failed: %s", client_id, exc)

    @contextlib.contextmanager
    def during(self, client_id: str) -> Iterator[None]:
        """Hold the lease for a ``with`` block: released after it unless it was held before."""
        held = client_id in self._held
        if not held:
            self._take(client_id, explicit=False)
        try:
            yield
        finally:
            if not held:
                self.release(client_id)

    def _take(self, client_id: str, *, explicit: bool) -> None:
        if not os.path.isdir(self._directory):
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
        path = self.path(client_id)
        fd = flock(path)
        if fd is None:
            raise SessionLocked(
                f"session {client_id!r} is held by another process or store (lock file {path})"
            )
        self._held[client_id] = FlockLease(fd, explicit)


def remove_expired(
    leases: FlockLeases, expired: Iterable[str], remove: Callable[[Sequence[str]], int]
) -> int:
    """``cleanup_expired`` for a store with flock leases: how many sessions were removed.

    ``expired`` lists the sessions that looked expired. Those a client of this store holds
    (an explicit lease) are skipped, and so are those another process holds (their lease
    cannot be taken); the others are leased, and ``remove`` gets them: it must check their
    expiry again (the owner may have touched them since they were listed) and remove those
    still expired, returning the count. The leases taken here are released afterwards.
    """
    taken: list[str] = []
    eligible: list[str] = []
    try:
        for client_id in expired:
            if leases.is_explicit(client_id):
                continue
            if client_id not in leases:
                try:
                    leases.ensure(client_id)
                except SessionLocked:
                    continue
                taken.append(client_id)
            eligible.append(client_id)
        return remove(eligible) if eligible else 0
    finally:
        for client_id in taken:
            leases.release(client_id)
