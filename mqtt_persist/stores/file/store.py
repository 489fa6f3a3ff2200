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
import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from mqtt_persist.errors import (
    SessionCorrupt,
    SessionExpired,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import Operation, SessionState, StoredMessage
from mqtt_persist.stores._checks import check_operations, check_queued_limit, check_read_limit
from mqtt_persist.stores._expiry import is_expired, session_info, ttl_from
from mqtt_persist.stores._files import (
    file_base,
    fsync_directory,
    make_private_directory,
    quarantine_target,
)
from mqtt_persist.stores._leases import FlockLeases, remove_expired
from mqtt_persist.stores._worker import Worker
from mqtt_persist.stores.base import SessionInfo, StoreContext
from mqtt_persist.stores.file import snapshot
from mqtt_persist.stores.file.index import Entry, Index
from mqtt_persist.stores.file.journal import (
    RECORD,
    Damaged,
    encode_body,
    encode_record,
    read_and_parse,
    reader,
    recorded_access,
)
from mqtt_persist.stores.file.readback import read_messages
from mqtt_persist.stores.file.session import OpenSession, Paths
from mqtt_persist.stores.file.writer import (
    Commit,
    Syncer,
    failed_sync,
    forget_failed_sync,
    fresh,
)

__all__ = ["FileStore"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Planned(NamedTuple):
    """A batch encoded as the record an append would write."""

    record: bytes
    #: Where the batch's first operation lies once the record is appended.
    ops_offset: int
    now: float
    #: Whether the record carries the last access time.
    record_access: bool
    #: False: the journal must be rewritten instead (there is none yet, or it is to be compacted).
    fits: bool


class FileStore(StoreContext):
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
        # Event-loop side: worker jobs queued or running, per client id and for the whole store
        # (None). The loop writes to a session only while both are zero (see ``writer``).
        self._jobs: dict[str | None, int] = {}
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
        jobs = self._jobs
        jobs[scope] = jobs.get(scope, 0) + 1
        return await self._worker.run(self._job, scope, fn, *args, done=partial(self._done, scope))

    def _done(self, scope: str | None) -> None:
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

    def _plan(self, session: OpenSession, encoded: list[bytes], now: float) -> _Planned:
        """The record a batch of these encoded operations becomes, appended to ``session``."""
        record_access = now - session.persisted_access >= self._access_write_interval
        ops_bytes = b"".join(encoded)
        body = encode_body(ops_bytes, last_access=now if record_access else None)
        record = encode_record(body)
        ops_offset = session.size + RECORD.size + len(body) - len(ops_bytes)
        limit = max(self._compact_threshold, 4 * session.snapshot_size)
        fits = session.fd is not None and session.size + len(record) <= limit
        return _Planned(record, ops_offset, now, record_access, fits)

    def _append(
        self,
        session: OpenSession,
        ops: Sequence[Operation],
        encoded: list[bytes],
        planned: _Planned,
        committed: asyncio.Future[None] | None,
    ) -> bool:
        """Write the planned record (on the loop or the worker thread); True: ``committed``
        resolves once it is durable (and in the index). Without fsync it is done already."""
        session.append(planned.record)
        session.last_access = planned.now
        if planned.record_access:
            session.persisted_access = planned.now
        if committed is None:
            session.index.apply_batch(ops, encoded, planned.ops_offset)  # the write was the commit
            return False
        # A tuple: the operations are read again after the caller may have stopped waiting.
        settle = partial(session.index.apply_batch, tuple(ops), encoded, planned.ops_offset)
        try:
            self._syncer.submit(Commit(session, settle, committed.get_loop(), committed))
        except BaseException:
            # Written but never to be synced or indexed (no thread could start): the file is
            # not what the index says, so the next call reads it again.
            session.broken = True
            raise
        return True

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

    def _expiry_on_disk(self, client_id: str) -> tuple[float, float | None] | None:
        """Last access and TTL of a session (open or not); None: no readable journal."""
        session = self._sessions.get(client_id)
        if session is not None:
            return session.last_access, session.ttl
        result = read_and_parse(self._paths(client_id).journal, False)
        if result is None or isinstance(result, Damaged):
            return None
        return recorded_access(result), result.ttl

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

    def _load_job(self, client_id: str, queued_limit: int | None) -> SessionState | None:
        if client_id not in self._sessions and not self._has_journal(client_id):
            return None
        session = self._session(client_id)
        if session.fd is None:
            return None
        now = self._clock()
        if session.expired(now):
            self._remove_journal(client_id)
            raise SessionExpired(f"session {client_id!r} expired and was removed")
        session.last_access = now
        index = session.index
        queued = index.queued_after(None, queued_limit)
        entries = sorted(queued + index.inflight_entries()) if index.inflight else queued
        aside = self._read(session, index.set_aside_entries())
        return index.to_state(self._read(session, entries), len(queued), aside)

    def _read_queued_job(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        if client_id not in self._sessions and not self._has_journal(client_id):
            return []
        session = self._session(client_id)
        if session.fd is None:
            return []
        session.last_access = self._clock()
        return self._read(session, session.index.queued_after(after_seq, limit))

    def _read(self, session: OpenSession, entries: list[Entry]) -> list[StoredMessage]:
        """The messages of ``entries``, read back from the session's journal."""
        if not entries:
            return []
        assert session.fd is not None
        return read_messages(session.fd, session.size, entries)

    def _save_job(self, state: SessionState) -> None:
        client_id = state.client_id
        try:
            session = self._session(client_id)
        except SessionCorrupt:
            # The damaged journal was moved aside; the snapshot replaces it anyway.
            session = self._session(client_id)
        source = snapshot.state_source(state)
        session.rewrite(source, snapshot.meta_of(state), state.last_seq, self._clock())

    def _apply_job(
        self,
        client_id: str,
        ops: Sequence[Operation],
        encoded: list[bytes],
        committed: asyncio.Future[None] | None,
    ) -> bool:
        """An apply the loop could not do; True: ``committed`` resolves once it is durable."""
        if not ops:
            if (session := self._sessions.get(client_id)) is not None:
                if session.sync_error is not None:
                    raise fresh(session.sync_error)
                session.last_access = self._clock()
            return False
        session = self._session(client_id)
        planned = self._plan(session, encoded, self._clock())
        if planned.fits:
            return self._append(session, ops, encoded, planned, committed)
        # Compact instead of appending: replay the batch onto the index as if the record
        # followed the journal, and stream the result from both into a new file (durable when
        # the rewrite returns).
        record = planned.record
        index = session.index
        index.apply_batch(ops, encoded, planned.ops_offset)
        read = reader(session.fd, session.size, record)
        try:
            source = snapshot.index_source(read, session.size + len(record), index)
            session.rewrite(source, index.meta, index.last_seq, planned.now)
        except BaseException:
            if session.index is index:
                # The index holds a batch the journal does not (a copy would have cost
                # another index): forget the session, so it is read from the file again.
                self._forget(session)
            raise
        return False

    def _delete_job(self, client_id: str) -> None:
        if client_id not in self._leases and not self._has_journal(client_id):
            return
        with self._leases.during(client_id):
            self._remove_journal(client_id)

    def _exists_job(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        if session is not None:
            return session.fd is not None and not session.expired(self._clock())
        result = read_and_parse(self._paths(client_id).journal, False)
        if result is None:
            return False
        if isinstance(result, Damaged):
            return True  # load() reports it (and quarantines it)
        return not is_expired(recorded_access(result), result.ttl, self._clock())

    def _list_job(self) -> list[SessionInfo]:
        infos: list[SessionInfo] = []
        open_sessions = {file_base(cid): s for cid, s in self._sessions.items()}
        for name in sorted(os.listdir(self._directory)):
            if not name.endswith(".journal"):
                continue
            session = open_sessions.get(name.removesuffix(".journal"))
            if session is not None:
                if session.fd is not None:
                    infos.append(
                        _info(
                            session.client_id,
                            session.created_at,
                            session.last_access,
                            session.ttl,
                            session.index,
                        )
                    )
                continue
            path = os.path.join(self._directory, name)
            result = read_and_parse(path, True)
            if result is None:
                continue
            if isinstance(result, Damaged):
                logger.warning("skipping damaged session journal %s: %s", path, result.reason)
                continue
            assert result.index is not None
            infos.append(
                _info(
                    result.client_id,
                    result.created_at,
                    recorded_access(result),
                    result.ttl,
                    result.index,
                )
            )
        return infos

    def _update_ttl_job(self, client_id: str, ttl: float | None) -> None:
        session = self._session(client_id)
        now = self._clock()
        if session.fd is not None and session.expired(now):
            self._remove_journal(client_id)
            session = self._session(client_id)
        session.ttl = ttl
        session.append_metadata(now, ttl=True)
        session.last_access = now

    def _cleanup_job(self) -> int:
        now = self._clock()
        expired = [
            info.client_id
            for info in self._list_job()
            if info.expires_at is not None and now >= info.expires_at
        ]

        def remove(client_ids: Sequence[str]) -> int:
            removed = 0
            for client_id in client_ids:
                # Re-checked under the lease: the owner may have touched it since we listed it.
                expiry = self._expiry_on_disk(client_id)
                if expiry is not None and is_expired(*expiry, self._clock()):
                    removed += self._remove_journal(client_id)
            return removed

        return remove_expired(self._leases, expired, remove)

    # --- SessionStore ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory (mode 0700) if needed. Idempotent; other methods call it."""
        await self._run(None, self._open_job)

    async def close(self) -> None:
        """Record last accesses, close every journal and release every lease. Idempotent.

        The store can be reopened afterwards.
        """
        jobs = self._jobs
        jobs[None] = jobs.get(None, 0) + 1
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
        written (nothing of it stays in the journal) or synced (the session is then refused
        for the rest of the process: see ``writer``).
        """
        # The check is the encoding, kept: the index records where each operation lands.
        encoded = check_operations(ops)
        session = self._writable_here(client_id)
        if session is not None:
            now = self._clock()
            if not ops:
                session.last_access = now
                return
            planned = self._plan(session, encoded, now)
            if planned.fits:
                if not self._fsync:
                    self._append(session, ops, encoded, planned, None)  # the write is the commit
                    return
                durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._append(session, ops, encoded, planned, durable)
                await durable
                return
        committed = asyncio.get_running_loop().create_future() if self._fsync else None
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


def _info(
    client_id: str, created_at: float, last_access: float, ttl: float | None, index: Index
) -> SessionInfo:
    return session_info(
        client_id,
        created_at=created_at,
        last_access=last_access,
        ttl=ttl,
        inflight=len(index.inflight),
        queued=index.q_live,
        set_aside=len(index.set_aside),
    )
