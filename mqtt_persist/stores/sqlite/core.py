"""The SQLite store's core: configuration, the worker-thread plumbing, the connection.

Opening the database (and quarantining a damaged file or session), mapping SQLite's errors to
the store's, and closing. The jobs that read, write and expire sessions build on it
(``reads``, ``writes``, ``expiry``); ``store.SQLiteStore`` is the facade. The threading rules
are in ``store``'s module documentation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from mqtt_persist.errors import (
    SessionCorrupt,
    StoreError,
)
from mqtt_persist.stores._files import fsync_directory, quarantine_target
from mqtt_persist.stores._leases import FlockLeases
from mqtt_persist.stores._worker import Worker
from mqtt_persist.stores.base import StoreContext
from mqtt_persist.stores.sqlite.rows import (
    SELECT_META,
    BadRow,
    Meta,
    meta_from_row,
    quarantine_rows,
    session_id,
)
from mqtt_persist.stores.sqlite.schema import (
    DamagedFile,
    configure,
    create_file,
    is_file_corruption,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


Synchronous = Literal["FULL", "NORMAL", "EXTRA"]


class SQLiteStoreCore(StoreContext):
    """Configuration, worker plumbing and the connection of a :class:`SQLiteStore`."""

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
