"""The store's side of a client's life, in one place.

Entering a client opens the store, takes the ownership lease of its session, loads it (or
finds it expired, or damaged), and records the session's expiry; while the client runs, expired
sessions of any client are removed now and then; leaving releases the lease and closes a store
the client created itself. Nothing is saved on leaving: every operation was committed by the
flusher, and a snapshot of the machine would miss queued messages that live only in the store.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import anyio

from mqtt_persist.client.options import ClientOptions
from mqtt_persist.errors import SessionCorrupt, SessionExpired
from mqtt_persist.log import ClientLogger
from mqtt_persist.session.state import SessionState
from mqtt_persist.stores.base import SessionStore

SessionStatus = Literal["new", "restored", "expired", "corrupt"]


class SessionStorage:
    """Opens, leases, loads, cleans up and releases one client's session in its store."""

    def __init__(
        self, store: SessionStore, *, owns_store: bool, options: ClientOptions, log: ClientLogger
    ) -> None:
        self.store = store
        self._owns_store = owns_store
        self._options = options
        self._log = log
        #: How the stored session was found on entry (see ``PersistentClient.session_status``).
        self.status: SessionStatus = "new"
        # A store that survives nothing the process does not (MemoryStore) gains nothing from
        # publish() waiting for its commit: the flusher still applies it before sending.
        self.durable = bool(getattr(store, "durable", True))

    async def open(self) -> SessionState | None:
        """Open the store, take the lease, load the session and record its expiry.

        Returns the stored session, or None for a new one. If loading fails the lease is
        released again before the error propagates.
        """
        store, client_id = self.store, self._options.client_id
        await store.open()
        try:
            await store.acquire(client_id)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Cancelled: a store may take the lease anyway, after its caller has gone (a
                # job already running on its worker thread). Give it back once that is done;
                # a store that holds none for this session does nothing.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await store.release(client_id)
            raise
        try:
            state = await self._load()
            # The expiry is stored with the session, so any process can clean it up. A new
            # session without one needs no write (update_ttl would create it on disk now).
            expires_after = self._options.expires_after
            if expires_after is not None or state is not None:
                await store.update_ttl(client_id, expires_after)
        except BaseException:
            # Shielded: cancelled while loading (a timeout around entering the client), an
            # unshielded release is cancelled too, and the lease would stay taken for good.
            with anyio.CancelScope(shield=True):
                await store.release(client_id)
            raise
        if state is not None and not state.is_empty:
            self.status = "restored"
        return state

    async def _load(self) -> SessionState | None:
        store, options = self.store, self._options
        if options.clean_session:
            await store.delete(options.client_id)
            return None
        try:
            return await store.load(
                options.client_id, queued_limit=options.queue_memory_limit or None
            )
        except SessionExpired:
            self.status = "expired"
            self._log.warning("the stored session had expired; starting a new session")
            return None
        except SessionCorrupt as exc:
            if options.on_corrupt == "raise":
                raise
            self.status = "corrupt"
            self._log.error(
                "THE STORED SESSION WAS UNREADABLE AND IS NOT RESTORED (%s); starting a new "
                "session; the damaged data was kept aside for inspection",
                exc,
            )
            await store.delete(options.client_id)
            return None

    async def cleanup_loop(self, interval: float) -> None:
        """Remove expired sessions from the store now and then; a failure is only logged."""
        while True:
            try:
                removed = await self.store.cleanup_expired()
            except Exception as exc:
                self._log.warning("cleanup of expired sessions failed: %r", exc)
            else:
                if removed:
                    self._log.info("removed %d expired session(s) from the store", removed)
            await anyio.sleep(interval)

    async def close(self) -> None:
        """Release the lease, and close the store if the client created it; never cancelled."""
        with anyio.CancelScope(shield=True):
            try:
                await self.store.release(self._options.client_id)
            finally:
                if self._owns_store:
                    await self.store.close()
