"""A crash-safe session store in one SQLite database: one row per message, WAL, group commit.

Durability model
    :meth:`SQLiteStore.apply` runs its batch in a ``BEGIN IMMEDIATE … COMMIT`` transaction on
    the store's single connection, in the database's WAL journal mode. Applies that queue up
    while a transaction commits (of one session or of many) go into the next transaction
    together, each batch inside its own ``SAVEPOINT``: a batch that fails is rolled back to its
    savepoint and fails alone, the others commit (group commit across calls: one COMMIT, one
    WAL fsync, for all of them; see ``writes``). With ``synchronous="FULL"`` (the
    default) SQLite appends the transaction's pages to the WAL and fsyncs it once before
    ``COMMIT`` returns, so a returned ``apply`` survives a crash or a power cut, and a crash at
    any point leaves all of a batch or none of it (SQLite's own recovery drops a WAL tail
    without a commit frame). ``"NORMAL"`` skips that fsync: a process crash still loses nothing
    (the WAL is written before ``COMMIT`` returns), a power cut may lose the last commits.
    ``"EXTRA"`` is FULL plus directory fsyncs after journal deletions (which matter for
    rollback journals; in WAL mode it costs and gives about what FULL does). On macOS
    ``fullfsync`` is switched on with FULL/EXTRA, so the fsync reaches the medium as
    FileStore's ``F_FULLFSYNC`` does.

Threading
    Every database call runs on the store's worker thread (``_worker.Worker``), which owns the
    one connection, so the event loop never blocks on SQLite and calls reach the database in
    the order they were made. Each public method is a single hop to that thread, running its
    whole transaction there (applies queued next to each other share one: ``run_gathered``):
    a caller cancelled while waiting either never started (nothing happened) or ran to
    completion (everything happened).

The facade here is built from ``core`` (configuration, worker plumbing, the connection,
quarantine), ``reads`` (load, paging, listing), ``writes`` (save, gathered applies) and
``expiry`` (delete, TTL, cleanup). Schema and format versions: see ``schema``; reading and
checking rows: ``rows``; what each journal operation does: ``operations``.

Metadata: ``created_at`` is set once; ``last_access`` is written in the same transaction as
every :meth:`~SQLiteStore.apply`, :meth:`~SQLiteStore.load`, :meth:`~SQLiteStore.save` and
:meth:`~SQLiteStore.update_ttl` (the sessions row is rewritten by those anyway, so this costs
nothing extra and another process listing sessions sees exact values); ``expires_at`` is
``last_access + ttl``.

Damage
    A row that cannot be a stored value (a QoS of 7, a NULL topic, a payload that is not a
    BLOB, text that is not UTF-8, ...) makes :meth:`~SQLiteStore.load` (or
    :meth:`~SQLiteStore.read_queued`) copy every row of that session into the ``quarantine*``
    tables and delete the originals in ONE transaction, then raise
    :class:`~mqtt_persist.errors.SessionCorrupt` naming the database, the table and the client
    id; the quarantined rows keep their exact values (the quarantine columns have no type
    affinity). A file that is not a database, or an SQLite ``SQLITE_CORRUPT`` error, moves the
    database (and its ``-wal``/``-shm``, renamed alike so the copy still opens with its WAL)
    to ``<name>.corrupt-<UTC timestamp>``; the next call starts a new, empty database. A
    database written by a newer format version raises
    :class:`~mqtt_persist.errors.UnsupportedFormatVersion` and is left in place for the newer
    library; older versions are upgraded in place by ``schema.MIGRATIONS``. A database of
    another application (a different ``application_id``, or foreign tables) is refused with
    :class:`~mqtt_persist.errors.StoreError` and not touched.

Files: the database and its ``-wal``/``-shm`` are 0600 (the database is created 0600 before
SQLite opens it, and SQLite gives the WAL files the database's mode); a missing parent
directory is created 0700. Leases live next to the database in ``<db>.locks/`` (0700), one
``<base>.lock`` (0600) per client id, where ``<base>`` is the client id with everything but
``[A-Za-z0-9_-]`` replaced, cut to 40 characters, plus 32 hex digits of its SHA-256.

Leases
    ``flock`` on one lock file per client id (``_leases.FlockLeases``: explicit and implicit
    leases, as in FileStore); a lock file and not a row, because a process that dies loses it
    with its file descriptors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mqtt_persist.session.state import Operation, SessionState, StoredMessage
from mqtt_persist.stores._checks import (
    check_client_id,
    check_operations,
    check_queued_limit,
    check_read_limit,
)
from mqtt_persist.stores._expiry import ttl_from
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.sqlite.core import Synchronous
from mqtt_persist.stores.sqlite.expiry import SQLiteExpiry
from mqtt_persist.stores.sqlite.reads import SQLiteReads
from mqtt_persist.stores.sqlite.writes import SQLiteWrites

__all__ = ["SQLiteStore", "Synchronous"]


class SQLiteStore(SQLiteWrites, SQLiteReads, SQLiteExpiry):
    """A :class:`~mqtt_persist.stores.base.SessionStore` keeping every session in one SQLite file.

    See the module documentation for the schema and the guarantees. ``path`` is the database
    file (created, with a missing parent directory, on first use). ``synchronous`` is SQLite's
    setting of that name: ``"FULL"`` (default) makes every :meth:`apply` durable against power
    loss when it returns, ``"NORMAL"`` only against a process crash, ``"EXTRA"`` adds a
    directory fsync. ``busy_timeout``: how long (seconds) a write waits for another process
    writing the same database. ``clock`` returns the current Unix time (last access, expiry).

    Several processes may share one database (each for its own client ids); SQLite serialises
    their writes. Calls must not race :meth:`close` on the same store object.
    """

    #: Committed sessions survive the process (and, with ``synchronous`` FULL/EXTRA, power loss).
    durable = True

    # --- SessionStore ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, creating it (0600; parent directory 0700) or upgrading it.

        Idempotent; every other method opens implicitly. Raises
        :class:`~mqtt_persist.errors.SessionCorrupt` when the file is not a usable database
        (it is moved aside; the next call starts a new one),
        :class:`~mqtt_persist.errors.UnsupportedFormatVersion` for a newer format (left in
        place) and :class:`~mqtt_persist.errors.StoreError` for another application's database.
        """
        await self._run(self._db)

    async def close(self) -> None:
        """Release every lease and close the database. Idempotent; the store can be reopened."""
        # The last job, run even if this caller is cancelled: leases go, the file is closed.
        await self._worker.stop(lambda: self._guarded(self._close_job))

    async def acquire(self, client_id: str) -> None:
        """Take the lease: ``flock`` on the client id's lock file, held until release/close.

        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process or another store
        holds it, or when this store already acquired it.
        """
        check_client_id(client_id)
        await self._run(self._leases.acquire, client_id)

    async def release(self, client_id: str) -> None:
        """Give the lease back. Idempotent."""
        if self._worker.running:
            await self._run(self._leases.release, client_id)

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """The stored session, or None; records the access and takes the lease if not held.

        With ``queued_limit``, only the in-flight messages and the ``queued_limit`` queued
        messages with the lowest sequence numbers are read; ``queued_not_loaded`` counts the
        rest and ``last_seq`` is the highest sequence number ever added. Raises
        :class:`~mqtt_persist.errors.SessionExpired` (the session is removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (its rows are quarantined) or
        :class:`~mqtt_persist.errors.SessionLocked` (another process holds it).
        """
        check_client_id(client_id)
        check_queued_limit(queued_limit)
        return await self._run(self._load_job, client_id, queued_limit)

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages (no packet ID) with ``seq > after_seq``, ascending, at most ``limit``.

        One range scan of the session's messages in seq order, stopping after ``limit`` queued
        ones. Takes the lease if not held (a damaged row is quarantined). An unknown session
        gives [].
        """
        check_client_id(client_id)
        check_read_limit(limit)
        return await self._run(self._read_queued_job, client_id, after_seq, limit)

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot, in one transaction.

        Keeps ``created_at`` and the TTL; ``last_seq`` never decreases. Queued messages the
        snapshot does not contain are removed like everything else it does not contain.
        """
        check_client_id(state.client_id)
        snapshot = state.copy()
        check_operations(snapshot.to_operations())  # refuse what cannot be stored, up front
        await self._run(self._save_job, snapshot)

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Apply ``ops`` atomically in one transaction (one fsync with FULL); durable on return.

        Applies queued while another transaction commits share the next transaction (and its
        fsync), each batch in a savepoint of its own, so each still succeeds or fails alone.
        Creates the session if there is none. An empty batch only counts as an access. Expiry
        is not checked: the caller holds the session. Raises
        :class:`~mqtt_persist.stores.serialization.EncodeError` (nothing applied) for an
        operation that cannot be stored.
        """
        batch = _checked_batch(client_id, ops)
        await self._worker.run_gathered(self._apply_gathered_job, client_id, batch)

    def begin_apply(
        self, client_id: str, ops: Sequence[Operation], durable: asyncio.Future[None]
    ) -> bool:
        """:meth:`apply` queued on the worker thread without an ``await``; ``durable`` gets
        its outcome (:class:`~mqtt_persist.stores.base.StartsCommits`). Always True."""
        batch = _checked_batch(client_id, ops)
        self._worker.start_gathered(durable, self._apply_gathered_job, client_id, batch)
        return True

    async def delete(self, client_id: str) -> None:
        """Remove the session's rows (quarantined rows stay). Idempotent.

        A lease this store holds stays held; otherwise the lease is taken for the removal only.
        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process holds the
        session.
        """
        check_client_id(client_id)
        await self._run(self._delete_job, client_id)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only; takes no lease).

        A session with damaged metadata counts as existing: :meth:`load` reports it.
        """
        check_client_id(client_id)
        return await self._run(self._exists_job, client_id)

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included (reads only; damaged rows are skipped)."""
        return await self._run(self._list_job)

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); durable.

        Creates an empty session when none is stored (an expired one counts as none). Counts as
        an access. Takes the lease if not held.
        """
        check_client_id(client_id)
        await self._run(self._update_ttl_job, client_id, ttl_from(seconds))

    async def cleanup_expired(self) -> int:
        """Remove every expired session nobody holds a lease on; returns how many."""
        return await self._run(self._cleanup_job)


def _checked_batch(client_id: str, ops: Sequence[Operation]) -> list[Operation]:
    """The batch of an apply, checked before it is queued (nothing applied if it fails)."""
    check_client_id(client_id)
    batch = list(ops)
    check_operations(batch)
    return batch
