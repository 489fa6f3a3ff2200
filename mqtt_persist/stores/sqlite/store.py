"""A crash-safe session store in one SQLite database: one row per message, WAL, group commit.

Durability model
    :meth:`SQLiteStore.apply` runs its batch in a ``BEGIN IMMEDIATE … COMMIT`` transaction on
    the store's single connection, in the database's WAL journal mode. Applies that queue up
    while a transaction commits (of one session or of many) go into the next transaction
    together, each batch inside its own ``SAVEPOINT``: a batch that fails is rolled back to its
    savepoint and fails alone, the others commit (group commit across calls: one COMMIT, one
    WAL fsync, for all of them; see ``_apply_gathered_job``). With ``synchronous="FULL"`` (the
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

Schema and format versions: see ``schema``; reading and checking rows: ``rows``; what each
journal operation does: ``operations``.

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

import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from mqtt_persist.errors import (
    InvalidClientId,
    SessionCorrupt,
    SessionExpired,
    StoreError,
)
from mqtt_persist.session.state import Operation, SessionState, StoredMessage
from mqtt_persist.stores._checks import check_operations, check_queued_limit, check_read_limit
from mqtt_persist.stores._expiry import session_info, ttl_from
from mqtt_persist.stores._files import fsync_directory, quarantine_target
from mqtt_persist.stores._leases import FlockLeases, remove_expired
from mqtt_persist.stores._worker import Outcome, Worker
from mqtt_persist.stores.base import SessionInfo, StoreContext
from mqtt_persist.stores.sqlite.operations import HANDLERS
from mqtt_persist.stores.sqlite.rows import (
    INT64_MAX,
    INT64_MIN,
    SELECT_META,
    SELECT_QUEUED_AFTER,
    SELECT_QUEUED_FIRST,
    BadRow,
    Meta,
    create_session,
    delete_data,
    delete_rows,
    fetch,
    list_metas,
    message_from_row,
    meta_from_row,
    quarantine_rows,
    read_state,
    session_id,
)
from mqtt_persist.stores.sqlite.schema import (
    DamagedFile,
    configure,
    create_file,
    is_file_corruption,
    transaction,
)

__all__ = ["SQLiteStore", "Synchronous"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The values of SQLite's ``PRAGMA synchronous`` that :class:`SQLiteStore` accepts.
Synchronous = Literal["FULL", "NORMAL", "EXTRA"]


def _check_client_id(client_id: str) -> None:
    try:
        client_id.encode("utf-8")
    except (AttributeError, UnicodeEncodeError) as exc:
        raise InvalidClientId(f"client id {client_id!r} cannot be stored: {exc}") from None


class SQLiteStore(StoreContext):
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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the store; nothing touches the disk before the first call."""
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(
                f"synchronous must be 'FULL', 'NORMAL' or 'EXTRA', not {synchronous!r}"
            )
        # Absolute now: a later chdir() must not move the sessions.
        self._path = os.path.abspath(os.fspath(path))
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._worker = Worker("mqtt-persist-sqlite")
        # Worker-thread side: touched only by jobs, which run one at a time in call order.
        self._conn: sqlite3.Connection | None = None
        self._leases = FlockLeases(self._path + ".locks", self._has_session)

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self._path)

    def lock_path(self, client_id: str) -> Path:
        """The lease file of ``client_id`` (whether or not it exists)."""
        return Path(self._leases.path(client_id))

    # --- plumbing -------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread: the one way any job reaches the database."""
        return await self._worker.run(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a job; report SQLite's and the OS's failures as the store's."""
        try:
            return fn(*args)
        except (sqlite3.Error, DamagedFile, OSError) as exc:
            error = self._store_error(exc)
            raise error from (None if isinstance(exc, DamagedFile) else exc)

    def _store_error(self, exc: Exception) -> Exception:
        """The store's error for a failure of SQLite or of the OS (others stay as they are).

        A damaged file is moved aside first (:meth:`_quarantine_file`).
        """
        if isinstance(exc, sqlite3.DatabaseError) and is_file_corruption(exc):
            return self._quarantine_file(str(exc))
        if isinstance(exc, sqlite3.Error):
            return StoreError(f"session database {self._path} failed: {exc}")
        if isinstance(exc, DamagedFile):
            return self._quarantine_file(str(exc))
        if isinstance(exc, OSError):
            return StoreError(f"session store I/O failed: {exc}")
        return exc

    def _db(self) -> sqlite3.Connection:
        """The connection, opening (and if need be creating) the database first."""
        if self._conn is None:
            self._connect()
            assert self._conn is not None
        return self._conn

    def _connect(self) -> None:
        create_file(self._path)
        self._conn = conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # only ever used on the worker thread, one job at a time
        )
        try:
            configure(conn, self._path, self._synchronous)
        except BaseException as exc:
            # A damaged file stays open for _quarantine_file, which moves it before closing
            # the connection (see there); anything else closes it now.
            damaged = isinstance(exc, DamagedFile) or (
                isinstance(exc, sqlite3.DatabaseError) and is_file_corruption(exc)
            )
            if not damaged:
                self._conn = None
                conn.close()
            raise

    def _quarantine_file(self, reason: str) -> SessionCorrupt:
        """Move the whole database aside (never delete it); the next call starts a new one.

        The files are renamed while the connection is still open and only then is it closed:
        closing first, SQLite would checkpoint and DELETE the -wal file by its name.
        """
        conn, self._conn = self._conn, None
        target = quarantine_target(self._path, ("", "-wal", "-shm"))
        try:
            os.rename(self._path, target)
            # The WAL belongs to that file: left behind, SQLite would replay it into the next,
            # new database. Renamed alike, the quarantined copy still opens with its WAL.
            for extra in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._path + extra, target + extra)
            fsync_directory(os.path.dirname(self._path))
        except OSError as exc:
            logger.error("could not quarantine damaged session database %s: %s", self._path, exc)
            return SessionCorrupt(f"{reason}; moving it aside failed: {exc}", location=self._path)
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        logger.error("damaged session database %s (%s) moved to %s", self._path, reason, target)
        return SessionCorrupt(reason, location=self._path, quarantined_to=target)

    def _quarantine_session(
        self, conn: sqlite3.Connection, sid: int, client_id: str, reason: str
    ) -> SessionCorrupt:
        """Inside the caller's transaction: move every row of the session to quarantine*."""
        qid = quarantine_rows(conn, sid, reason)
        where = f"quarantine tables of {self._path}, qid {qid}"
        logger.error("session %r in %s: %s; moved to the %s", client_id, self._path, reason, where)
        return SessionCorrupt(
            f"session {client_id!r}: {reason}", location=self._path, quarantined_to=where
        )

    def _meta_or_quarantine(
        self, conn: sqlite3.Connection, client_id: str
    ) -> Meta | SessionCorrupt | None:
        """Inside a transaction: the checked metadata, None, or the error of a quarantine."""
        row = conn.execute(SELECT_META, (client_id,)).fetchone()
        if row is None:
            return None
        try:
            return meta_from_row(row)
        except BadRow as bad:
            return self._quarantine_session(conn, row[0], client_id, bad.reason)

    def _has_session(self, client_id: str) -> bool:
        """Whether a lock file still guards data (if unsure: yes, and the file stays)."""
        if self._conn is None:
            return True
        try:
            return session_id(self._conn, client_id) is not None
        except sqlite3.Error:
            return True

    # --- jobs (worker thread) -------------------------------------------------------------------

    def _close_job(self) -> None:
        self._leases.release_all()
        if self._conn is not None:
            # The last connection to close checkpoints the WAL into the database file.
            conn, self._conn = self._conn, None
            conn.close()

    def _load_job(self, client_id: str, queued_limit: int | None) -> SessionState | None:
        conn = self._db()
        if client_id not in self._leases:
            if session_id(conn, client_id) is None:
                return None
            self._leases.ensure(client_id)
        now = self._clock()
        result: SessionState | StoreError | None
        # One write transaction: the access time, an expiry or a quarantine all commit with it.
        with transaction(conn):
            meta = self._meta_or_quarantine(conn, client_id)
            if meta is None or isinstance(meta, SessionCorrupt):
                result = meta
            elif meta.expired(now):
                delete_rows(conn, meta.sid)
                result = SessionExpired(f"session {client_id!r} expired and was removed")
            else:
                try:
                    result = read_state(conn, client_id, meta, queued_limit)
                except BadRow as bad:
                    result = self._quarantine_session(conn, meta.sid, client_id, bad.reason)
                else:
                    conn.execute(
                        "UPDATE sessions SET last_access = ? WHERE sid = ?", (now, meta.sid)
                    )
        if isinstance(result, StoreError):
            raise result
        return result

    def _read_queued_job(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        conn = self._db()
        sid = session_id(conn, client_id)
        if sid is None or limit == 0 or after_seq >= INT64_MAX:
            return []
        self._leases.ensure(client_id)
        try:
            if after_seq < INT64_MIN:  # below every 64-bit integer SQLite can hold
                rows = fetch(conn, "messages", SELECT_QUEUED_FIRST, (sid, limit))
            else:
                rows = fetch(conn, "messages", SELECT_QUEUED_AFTER, (sid, after_seq, limit))
            return [message_from_row(row) for row in rows]
        except BadRow as bad:
            with transaction(conn):
                if session_id(conn, client_id) == sid:
                    error = self._quarantine_session(conn, sid, client_id, bad.reason)
                else:  # pragma: no cover - needs another writer between the two statements
                    error = SessionCorrupt(bad.reason, location=self._path)
            raise error from None

    def _save_job(self, state: SessionState) -> None:
        client_id = state.client_id
        self._leases.ensure(client_id)
        conn = self._db()
        now = self._clock()
        with transaction(conn):
            meta = self._meta_or_quarantine(conn, client_id)
            if isinstance(meta, Meta):
                sid = meta.sid
                delete_data(conn, sid)
            else:
                # No session, or one with unreadable metadata, now in quarantine: start anew.
                sid = create_session(conn, client_id, now)
            _apply_rules(conn, sid, state.to_operations())
            # Never lower last_seq: a new message must not reuse a number already handed out.
            conn.execute(
                "UPDATE sessions SET last_access = ?, last_seq = max(last_seq, ?) WHERE sid = ?",
                (now, state.last_seq, sid),
            )

    def _apply_gathered_job(self, calls: Sequence[tuple[Any, ...]]) -> list[Outcome]:
        """The applies ``(client_id, ops)`` queued together, in ONE transaction and ONE COMMIT.

        Each batch runs inside its own savepoint: one that fails (a bad row, a constraint, a
        lease held elsewhere) is rolled back to it and fails alone, and the others commit. A
        failure of the transaction itself (BEGIN, COMMIT, a damaged file, SQLite rolling the
        whole transaction back on a full disk or an I/O error) fails every batch in it. Each
        caller learns its own outcome once the COMMIT holding its batch returned.
        """
        outcomes: list[Outcome] = [(None, None)] * len(calls)
        try:
            conn = self._db()
            included: list[int] = []
            for i, (client_id, ops) in enumerate(calls):
                try:
                    # An empty batch is only an access, and only to a session that exists.
                    if ops or session_id(conn, client_id) is not None:
                        self._leases.ensure(client_id)
                        included.append(i)
                except Exception as exc:
                    if _damaged(exc):
                        raise
                    outcomes[i] = (None, self._batch_error(exc))
            if not included:
                return outcomes
            now = self._clock()
            with transaction(conn):
                for i in included:
                    client_id, ops = calls[i]
                    conn.execute("SAVEPOINT apply")
                    try:
                        _apply_batch(conn, client_id, ops, now)
                    except Exception as exc:
                        # A damaged file, or SQLite rolled the whole transaction back (a full
                        # disk, an I/O error): every batch fails.
                        if _damaged(exc) or not conn.in_transaction:
                            raise
                        conn.execute("ROLLBACK TO apply")
                        outcomes[i] = (None, self._batch_error(exc))
                    conn.execute("RELEASE apply")
        except Exception as exc:
            error = self._store_error(exc)
            for i, (_, failed) in enumerate(outcomes):
                if failed is None:
                    outcomes[i] = (None, _copy_error(error, exc))
        return outcomes

    def _batch_error(self, exc: Exception) -> Exception:
        """The store's error for one batch that failed on its own."""
        error = self._store_error(exc)
        if error is not exc:
            error.__cause__ = exc
        return error

    def _delete_job(self, client_id: str) -> None:
        conn = self._db()
        if client_id not in self._leases and session_id(conn, client_id) is None:
            return
        with self._leases.during(client_id), transaction(conn):
            sid = session_id(conn, client_id)
            if sid is not None:
                delete_rows(conn, sid)

    def _exists_job(self, client_id: str) -> bool:
        row = self._db().execute(SELECT_META, (client_id,)).fetchone()
        if row is None:
            return False
        try:
            meta = meta_from_row(row)
        except BadRow:
            return True  # load() reports it (and quarantines it)
        return not meta.expired(self._clock())

    def _list_job(self) -> list[SessionInfo]:
        return [
            session_info(
                client_id,
                created_at=meta.created_at,
                last_access=meta.last_access,
                ttl=meta.ttl,
                inflight=meta.inflight,
                queued=meta.queued,
                set_aside=meta.set_aside,
            )
            for client_id, meta in list_metas(self._db(), self._path)
        ]

    def _update_ttl_job(self, client_id: str, ttl: float | None) -> None:
        self._leases.ensure(client_id)
        conn = self._db()
        now = self._clock()
        with transaction(conn):
            meta = self._meta_or_quarantine(conn, client_id)
            if isinstance(meta, Meta) and meta.expired(now):
                # An expired session counts as none: the TTL applies to a new, empty one.
                delete_rows(conn, meta.sid)
                meta = None
            sid = meta.sid if isinstance(meta, Meta) else create_session(conn, client_id, now)
            conn.execute(
                "UPDATE sessions SET ttl = ?, last_access = ? WHERE sid = ?", (ttl, now, sid)
            )

    def _cleanup_job(self) -> int:
        conn = self._db()
        now = self._clock()
        expired = [
            client_id for client_id, meta in list_metas(self._db(), self._path) if meta.expired(now)
        ]

        def remove(client_ids: Sequence[str]) -> int:
            removed = 0
            with transaction(conn):
                for client_id in client_ids:
                    # Again under the write lock: its owner may have touched it since.
                    row = conn.execute(SELECT_META, (client_id,)).fetchone()
                    if row is None:
                        continue
                    try:
                        meta = meta_from_row(row)
                    except BadRow:
                        continue
                    if meta.expired(now):
                        delete_rows(conn, meta.sid)
                        removed += 1
            return removed

        return remove_expired(self._leases, expired, remove)

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
        _check_client_id(client_id)
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
        _check_client_id(client_id)
        check_queued_limit(queued_limit)
        return await self._run(self._load_job, client_id, queued_limit)

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages (no packet ID) with ``seq > after_seq``, ascending, at most ``limit``.

        One range scan of the session's messages in seq order, stopping after ``limit`` queued
        ones. Takes the lease if not held (a damaged row is quarantined). An unknown session
        gives [].
        """
        _check_client_id(client_id)
        check_read_limit(limit)
        return await self._run(self._read_queued_job, client_id, after_seq, limit)

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot, in one transaction.

        Keeps ``created_at`` and the TTL; ``last_seq`` never decreases. Queued messages the
        snapshot does not contain are removed like everything else it does not contain.
        """
        _check_client_id(state.client_id)
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
        _check_client_id(client_id)
        batch = list(ops)
        check_operations(batch)
        await self._worker.run_gathered(self._apply_gathered_job, client_id, batch)

    async def delete(self, client_id: str) -> None:
        """Remove the session's rows (quarantined rows stay). Idempotent.

        A lease this store holds stays held; otherwise the lease is taken for the removal only.
        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process holds the
        session.
        """
        _check_client_id(client_id)
        await self._run(self._delete_job, client_id)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only; takes no lease).

        A session with damaged metadata counts as existing: :meth:`load` reports it.
        """
        _check_client_id(client_id)
        return await self._run(self._exists_job, client_id)

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included (reads only; damaged rows are skipped)."""
        return await self._run(self._list_job)

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); durable.

        Creates an empty session when none is stored (an expired one counts as none). Counts as
        an access. Takes the lease if not held.
        """
        _check_client_id(client_id)
        await self._run(self._update_ttl_job, client_id, ttl_from(seconds))

    async def cleanup_expired(self) -> int:
        """Remove every expired session nobody holds a lease on; returns how many."""
        return await self._run(self._cleanup_job)


def _apply_batch(
    conn: sqlite3.Connection, client_id: str, ops: Sequence[Operation], now: float
) -> None:
    """Inside a transaction: one apply's batch (creating the session), stamped ``now``."""
    if not ops:
        conn.execute("UPDATE sessions SET last_access = ? WHERE client_id = ?", (now, client_id))
        return
    sid = session_id(conn, client_id)
    if sid is None:
        sid = create_session(conn, client_id, now)
    else:
        conn.execute("UPDATE sessions SET last_access = ? WHERE sid = ?", (now, sid))
    _apply_rules(conn, sid, ops)


def _damaged(exc: Exception) -> bool:
    """Whether ``exc`` says the database file itself is damaged."""
    return isinstance(exc, DamagedFile) or (
        isinstance(exc, sqlite3.DatabaseError) and is_file_corruption(exc)
    )


def _copy_error(error: Exception, cause: BaseException) -> Exception:
    """A copy of ``error`` for one more caller (one instance raised in many tasks would
    collect all their tracebacks), made without calling its ``__init__``."""
    duplicate = type(error).__new__(type(error))
    duplicate.args = error.args
    duplicate.__dict__.update(error.__dict__)
    duplicate.__cause__ = cause
    return duplicate


def _apply_rules(conn: sqlite3.Connection, sid: int, ops: Sequence[Operation]) -> None:
    """Apply operations through :data:`~.operations.HANDLERS`, a run of one type at a time."""
    for op_type, group in itertools.groupby(ops, type):
        HANDLERS[op_type](conn, sid, list(group))
