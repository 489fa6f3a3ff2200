"""A crash-safe session store: one append-only journal file per session.

Durability model
    :meth:`FileStore.apply` encodes the whole batch into ONE record, writes it with one
    ``pwrite`` on the event loop and returns once ONE ``fdatasync`` that started after the
    write completed (group commit: one sync for every record written before it started,
    submitted through Linux AIO, or run by the store's syncer thread where there is none; see
    ``writer``). With fsync on the journal is preallocated with zeros ahead of its records, so
    that sync has no file size to commit (``session.OpenSession.append``). A record carries its
    length and a CRC32, so a crash at any byte leaves either the complete record (the batch
    happened) or a torn tail that :meth:`FileStore.load` discards (it did not); see
    ``journal`` for the preallocated tail. Creating a journal, compacting it and
    :meth:`FileStore.save` write a complete new file to a temporary name, fsync it,
    ``os.replace`` it over the journal and fsync the directory: a crash leaves the old file or
    the new one, never a mix. Those three cost two fsyncs (file and directory) instead of one;
    a plain append costs at most one, shared with whatever else was written meanwhile. With
    ``fsync=False`` the write is the commit and ``apply`` never leaves the event loop.

Threading
    An ``apply`` that appends to an open session writes on the event loop; every other public
    method, and an ``apply`` that opens, creates or compacts a journal, is ONE job on the
    store's worker thread (``_worker.Worker``); syncs complete on the loop (AIO,
    ``writer.LoopSyncs``) or run on the syncer thread (``writer.Syncer``). The loop writes to a
    session only while no job for it (or for the whole store) is queued or running, and a job
    first waits for the session's records to be synced (``writer``): so calls happen in the
    order they were made, the three threads never touch one session at once, and a cancelled
    caller's call either never started or runs to its end.

Memory
    While a session is open the store keeps an *index* of it (``index.Index``), not its
    replayed state: the small parts (inbound QoS 2 IDs, subscriptions, pending unsubscribes,
    the highest sequence number) in full, and for every stored message only where its
    ``MessageAdded`` operation lies in the journal plus what later operations changed (packet
    ID, released). Queued messages cost about 20 bytes each, never their payload, so an offline
    client may queue far more than fits in memory. Payloads are read back with positioned reads
    (``readback``) when :meth:`FileStore.load` or :meth:`FileStore.read_queued` return
    messages, and compaction streams them from the old file into the new one (``snapshot``).
    The index describes only what is durably in the file: an append updates it once its sync
    completed, before ``apply`` returns (read-after-write); a rewrite replaces it with the new
    file's; should a compaction fail
    half way, the store forgets the session and reads it from the file again. Opening a journal
    reads it in windows of about a megabyte (``sizes``); only a migration from an older format
    holds a whole file.

The journal format, metadata (last access, TTL) and what damage does: ``journal``.

Files (directory created 0700, every file created 0600): for a client id, ``<base>.journal``,
``<base>.lock`` (the lease) and ``<base>.tmp`` (a rewrite in progress), where ``<base>`` is
``_files.file_base(client_id)``: safe for any Unicode, ``/``, ``..`` or very long ids,
distinct on case-insensitive file systems, and still recognisable. The real client id is stored
in the header.

Leases
    ``flock`` on the session's lock file (``_leases.FlockLeases``). Every operation that reads
    with intent to repair or writes a session (``load``, ``read_queued``, ``apply``, ``save``,
    ``update_ttl``) takes the lease implicitly when this store does not hold it yet, and keeps
    it until ``release``/``close``, so two processes never write one journal and one never
    truncates a tail the other is still writing; ``delete`` and ``cleanup_expired`` take it
    only for the removal; ``list_sessions`` and ``exists`` only read. A lock file is removed
    (while still locked) when its session has no journal left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

from mqtt_persist.session.state import Operation, SessionState, StoredMessage
from mqtt_persist.stores._checks import check_operations, check_queued_limit, check_read_limit
from mqtt_persist.stores._expiry import ttl_from
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.file.appends import FileAppends
from mqtt_persist.stores.file.expiry import FileExpiry
from mqtt_persist.stores.file.loading import FileLoading


class FileStore(FileAppends, FileLoading, FileExpiry):
    """A :class:`~mqtt_persist.stores.base.SessionStore` keeping one journal file per session.

    See the module documentation for the format and the guarantees. ``fsync=False`` skips every
    fsync (tests, throw-away data): a process crash still loses nothing, a power cut may.
    ``compact_threshold_bytes``: a journal is rewritten as a snapshot when an append would grow
    it past ``max(compact_threshold_bytes, 4 * its size after the last rewrite)``.
    ``access_write_interval``: how stale the last access recorded on disk may get (seconds).
    ``clock`` returns the current Unix time (for last access and expiry).

    A store is used from one event loop at a time (its appends run on that loop); one loop
    after another is fine.
    """

    #: Sessions survive the process (and, with ``fsync``, power loss).
    durable = True

    async def open(self) -> None:
        """Create the directory (mode 0700) if needed. Idempotent; other methods call it."""
        await self._run(None, self._open_job)

    async def close(self) -> None:
        """Record last accesses, close every journal and release every lease. Idempotent.

        The store can be reopened afterwards.
        """
        self._queued(None)
        await self._worker.stop(self._close_job, done=partial(self._done, None))

    async def acquire(self, client_id: str) -> None:
        """Take the lease: ``flock`` on the session's lock file, held until release/close.

        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process or another store
        holds it, or when this store already acquired it.
        """
        await self._run(client_id, self._leases.acquire, client_id)

    async def release(self, client_id: str) -> None:
        """Record the last access, close the journal and give the lease back. Idempotent."""
        if self._worker.running:
            await self._run(client_id, self._release_job, client_id)

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """Read the session (repairing a torn tail), or None; takes the lease if not held.

        With ``queued_limit``, only the in-flight messages and the first ``queued_limit``
        queued ones are read back from the journal (see
        :meth:`~mqtt_persist.stores.base.SessionStore.load`); the rest stay on disk.

        Raises :class:`~mqtt_persist.errors.SessionExpired` (the session is removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (the journal is quarantined) or
        :class:`~mqtt_persist.errors.SessionLocked` (another process holds the session).
        """
        check_queued_limit(queued_limit)
        return await self._run(client_id, self._load_job, client_id, queued_limit)

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages with ``seq > after_seq``, ascending, at most ``limit``.

        Read back from the journal with a few positioned reads (consecutive messages share
        one); the index finds them by bisection. Like :meth:`load` this takes the lease if not
        held and counts as an access; like :meth:`apply` it does not check expiry: the caller
        holds the session.
        """
        check_read_limit(limit)
        return await self._run(client_id, self._read_queued_job, client_id, after_seq, limit)

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot (atomic file replace).

        The journal then holds exactly ``state``'s messages: queued messages that a ``load``
        with ``queued_limit`` left out of ``state`` are not kept.
        """
        snapshot_state = state.copy()
        check_operations(snapshot_state.to_operations())  # refuse what cannot be stored
        await self._run(snapshot_state.client_id, self._save_job, snapshot_state)

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Append ``ops`` as one record with one write; durable and in the index on return.

        The record is written on the event loop and synced by the syncer thread, one sync for
        every record written before it started (see ``writer``); with ``fsync=False`` it is
        done without leaving the loop. The first batch of a new session, and a batch that
        triggers compaction, replace the file instead (two fsyncs), as a job on the worker
        thread, as does any batch while another call for this session is queued there. An
        empty batch only counts as an access. Expiry is not checked: the caller holds the
        session. Raises :class:`~mqtt_persist.errors.StoreError` if the record could not be
        written or handed to a syncer thread (none could start; nothing of it stays in the
        journal either way) or synced (the session is then refused for the rest of the
        process: see ``writer``).
        """
        # The check is the encoding, kept: the index records where each operation lands.
        encoded = check_operations(ops)
        committed = asyncio.get_running_loop().create_future() if self._fsync else None
        if not ops:
            session = self._writable_here(client_id)
            if session is not None:
                session.last_access = self._clock()
                return
        elif self._append_here(client_id, ops, encoded, committed):
            if committed is not None:
                await committed
            return
        try:
            wait = await self._run(client_id, self._apply_job, client_id, ops, encoded, committed)
        except asyncio.CancelledError:
            # The job runs (or ran) anyway; nobody will wait for its sync.
            if committed is not None:
                committed.cancel()
            raise
        if wait:
            assert committed is not None
            await committed

    def begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        """:meth:`apply` started without an ``await``
        (:class:`~mqtt_persist.stores.base.StartsCommits`).

        True when the record could be appended on the event loop (it is written; ``durable``
        resolves once it is synced, at once with ``fsync=False``); False when ``apply`` must
        run it as a job (a new session, a compaction, a job of this session queued).
        """
        encoded = check_operations(ops)
        if not self._append_here(client_id, ops, encoded, durable if self._fsync else None):
            return False
        if not self._fsync:
            durable.set_result(None)
        return True

    async def delete(self, client_id: str) -> None:
        """Remove the session's journal (quarantined files stay). Idempotent.

        A lease this store holds stays held; otherwise the lease is taken for the removal only.
        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process holds the
        session.
        """
        await self._run(client_id, self._delete_job, client_id)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only; takes no lease).

        A damaged journal counts as existing: :meth:`load` reports (and quarantines) it.
        """
        return await self._run(client_id, self._exists_job, client_id)

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included (reads only; damaged files are skipped)."""
        return await self._run(None, self._list_job)

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); durable.

        Creates an empty session when none is stored (an expired one counts as none), so the
        expiry is in force from now on even before the first operation is applied. Takes the
        lease if not held.
        """
        await self._run(client_id, self._update_ttl_job, client_id, ttl_from(seconds))

    async def cleanup_expired(self) -> int:
        """Remove every expired session nobody holds a lease on; returns how many."""
        return await self._run(None, self._cleanup_job)
