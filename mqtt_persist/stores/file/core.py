"""The file store's core: configuration, the worker-thread plumbing and the open sessions.

Opening (and recovering) a session's journal, quarantining a damaged one, removing a journal,
and the jobs that open the directory and release or close sessions. The jobs that read, write
and expire sessions build on it (``loading``, ``appends``, ``expiry``); ``store.FileStore`` is
the facade. The threading rules are in ``store``'s module documentation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mqtt_persist.errors import (
    SessionCorrupt,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.stores._files import (
    file_base,
    fsync_directory,
    make_private_directory,
    quarantine_target,
)
from mqtt_persist.stores._leases import FlockLeases
from mqtt_persist.stores._worker import Worker
from mqtt_persist.stores.base import StoreContext
from mqtt_persist.stores.file.session import OpenSession, Paths
from mqtt_persist.stores.file.writer import (
    Syncer,
    failed_sync,
    forget_failed_sync,
    fresh,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class FileStoreCore(StoreContext):
    """Configuration, worker plumbing and the open sessions of a :class:`FileStore`."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        compact_threshold_bytes: int = 1 << 20,
        access_write_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the store; nothing touches the disk before :meth:`open`."""
        # Absolute now: a later chdir() must not move the sessions.
        self._directory = Path(os.path.abspath(directory))
        self._fsync = fsync
        self._compact_threshold = compact_threshold_bytes
        self._access_write_interval = access_write_interval
        self._clock = clock
        self._worker = Worker("mqtt-persist-file")
        self._syncer = Syncer("mqtt-persist-file-sync")
        # Worker jobs queued or running, per client id and for the whole store (None). The loop
        # writes to a session only while both are zero (see ``writer``). Counted up on the loop,
        # down on the worker as soon as a job is through (its caller's loop may be closed by
        # then), so both change it under the lock; the loop reads it without.
        self._jobs: dict[str | None, int] = {}
        self._jobs_lock = threading.Lock()
        # Worker-thread side: touched only by jobs, which run one at a time in call order (and
        # by the loop's appends, which never overlap a job of their session).
        self._opened = False
        self._sessions: dict[str, OpenSession] = {}
        self._leases = FlockLeases(str(self._directory), self._has_journal)

    @property
    def directory(self) -> Path:
        """Where the journals live."""
        return self._directory

    def journal_path(self, client_id: str) -> Path:
        """The journal file of ``client_id`` (whether or not it exists)."""
        return Path(self._paths(client_id).journal)

    # --- plumbing -------------------------------------------------------------------------------

    async def _run(self, scope: str | None, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` as one job on the worker thread, the directory opened first.

        ``scope`` is the client id whose session the job touches (None: any of them); the loop
        does not write to that session until the worker is through with the job.
        """
        self._queued(scope)
        return await self._worker.run(self._job, scope, fn, *args, done=partial(self._done, scope))

    def _queued(self, scope: str | None) -> None:
        """Count a job for ``scope`` (on the loop) until :meth:`_done` (on the worker)."""
        with self._jobs_lock:
            jobs = self._jobs
            jobs[scope] = jobs.get(scope, 0) + 1

    def _done(self, scope: str | None) -> None:
        with self._jobs_lock:
            jobs = self._jobs
            left = jobs[scope] - 1
            if left:
                jobs[scope] = left
            else:
                del jobs[scope]

    def _job(self, scope: str | None, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            self._open_job()
            self._settle(scope)
            return fn(*args)
        except OSError as exc:
            raise StoreError(f"session store I/O failed: {exc}") from exc

    def _settle(self, scope: str | None) -> None:
        """Wait until the records written to ``scope``'s session (None: to any) are synced."""
        if not self._fsync:
            return
        if scope is None:
            for each in list(self._sessions.values()):
                self._syncer.settle(each)
        elif (session := self._sessions.get(scope)) is not None:
            self._syncer.settle(session)

    def _paths(self, client_id: str) -> Paths:
        base = os.path.join(self._directory, file_base(client_id))
        return Paths(base + ".journal", base + ".lock", base + ".tmp")

    def _has_journal(self, client_id: str) -> bool:
        return os.path.exists(self._paths(client_id).journal)

    def _sync_directory(self) -> None:
        if self._fsync:
            fsync_directory(str(self._directory))

    def _quarantine(self, path: str, reason: str, *, newer_version: bool) -> SessionCorrupt:
        target = quarantine_target(path)
        try:
            os.rename(path, target)
            self._sync_directory()
        except OSError as exc:
            logger.error("could not quarantine damaged journal %s: %s", path, exc)
            return SessionCorrupt(f"{reason}; moving it aside failed: {exc}", location=path)
        logger.error("damaged session journal %s (%s) moved to %s", path, reason, target)
        error = UnsupportedFormatVersion if newer_version else SessionCorrupt
        return error(reason, location=path, quarantined_to=target)

    def _session(self, client_id: str) -> OpenSession:
        """The open session of ``client_id``, taking the lease and reading it if needed.

        A session whose append could not be undone is read again (its tail repaired); one whose
        journal failed to sync in this process is refused (StoreError).
        """
        session = self._sessions.get(client_id)
        if session is not None and session.broken:
            self._forget(session)
            session = None
        if session is not None and session.sync_error is not None:
            raise fresh(session.sync_error)
        if session is None:
            if (error := failed_sync(self._paths(client_id).journal)) is not None:
                raise error
            self._leases.ensure(client_id)
            session = OpenSession.open(
                client_id, self._paths(client_id), self._clock(), self._fsync, self._quarantine
            )
            self._sessions[client_id] = session
        return session

    def _writable_here(self, client_id: str) -> OpenSession | None:
        """The open session the event loop may append to now, or None (then a job must)."""
        jobs = self._jobs
        if jobs and (None in jobs or client_id in jobs):
            return None
        session = self._sessions.get(client_id)
        if session is None or session.fd is None or session.broken:
            return None
        if session.sync_error is not None:
            raise fresh(session.sync_error)
        return session

    def _forget(self, session: OpenSession) -> None:
        """Drop the open session (the lease stays): the next operation reads the journal."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        session.close()

    def _remove_journal(self, client_id: str) -> bool:
        """Delete the journal (and a stale temp file); True if there was one."""
        session = self._sessions.pop(client_id, None)
        if session is not None:
            session.close()
        paths = self._paths(client_id)
        forget_failed_sync(paths.journal)  # a new journal of this name starts clean
        removed = []
        for path in (paths.journal, paths.tmp):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"could not remove {path}: {exc}") from exc
        if removed:
            # Durably gone: a removed session must not come back after a power cut.
            self._sync_directory()
        return paths.journal in removed

    def _delete_job(self, client_id: str) -> None:
        if client_id not in self._leases and not self._has_journal(client_id):
            return
        with self._leases.during(client_id):
            self._remove_journal(client_id)

    # --- jobs (worker thread) -------------------------------------------------------------------

    def _open_job(self) -> None:
        if self._opened:
            return
        directory = str(self._directory)
        try:
            make_private_directory(directory, sync=self._fsync)
            mode = os.stat(directory).st_mode
        except OSError as exc:
            raise StoreError(f"cannot create session directory {directory}: {exc}") from exc
        if mode & 0o077:
            # Not changed behind the user's back (it may be a shared directory on purpose);
            # the files themselves are 0600 either way.
            logger.warning(
                "session directory %s is accessible to other users (mode %o); 0700 is advised",
                directory,
                mode & 0o777,
            )
        self._opened = True

    def _release_job(self, client_id: str) -> None:
        session = self._sessions.pop(client_id, None)
        if session is not None and session.fd is not None:
            try:
                unusable = session.broken or session.sync_error is not None
                if not unusable and session.last_access > session.persisted_access:
                    session.append_metadata(session.last_access, ttl=False)
            except (OSError, StoreError) as exc:
                logger.warning("%s: could not record last access: %s", session.paths.journal, exc)
            finally:
                session.close()
        self._leases.release(client_id)

    def _close_job(self) -> None:
        self._settle(None)
        failures: list[StoreError] = []
        for client_id in {*self._leases, *self._sessions}:
            try:
                try:
                    self._release_job(client_id)
                except OSError as exc:
                    raise StoreError(f"session store I/O failed: {exc}") from exc
            except StoreError as exc:
                # Keep going: every other lease must still be released.
                logger.error("closing session %r failed: %s", client_id, exc)
                failures.append(exc)
        self._opened = False
        self._syncer.stop()
        if failures:
            raise failures[0]
