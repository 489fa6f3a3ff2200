"""One open FileStore session: its journal file, kept open, and the index of what it holds.

An :class:`OpenSession` exists only while the store holds the session's lease. It is the one
place that writes a journal: :meth:`~OpenSession.append` (one record, one ``pwrite``; the
commit point of a batch is the :meth:`~OpenSession.make_durable` that follows, see ``writer``)
and :meth:`~OpenSession.rewrite` (a whole new file: create, compact, save, migrate). Its index
always describes what is durably in the file. ``append`` runs on the event loop or the worker
thread, ``make_durable`` on the syncer or the worker thread, everything else on the worker
thread; ``writer`` says why they never overlap.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mqtt_persist.errors import SessionCorrupt, StoreError
from mqtt_persist.session.state import SessionState
from mqtt_persist.stores._expiry import is_expired
from mqtt_persist.stores._files import datasync_fd, fsync_directory, fsync_fd
from mqtt_persist.stores.file import sizes, snapshot
from mqtt_persist.stores.file.index import Index
from mqtt_persist.stores.file.journal import (
    Damaged,
    Parsed,
    encode_body,
    encode_record,
    parse_fd,
    reader,
    recorded_access,
)
from mqtt_persist.stores.file.writer import fresh, mark_failed_sync

__all__ = ["OpenSession", "Paths", "close_fd"]

logger = logging.getLogger(__name__)

#: Moves a damaged journal aside: ``quarantine(path, reason, newer_version=...)`` returns the
#: error to raise.
Quarantine = Callable[..., SessionCorrupt]


@dataclass(frozen=True, slots=True)
class Paths:
    """The files of one session."""

    journal: str
    lock: str
    #: A rewrite in progress.
    tmp: str


def close_fd(fd: int | None) -> None:
    """Close ``fd`` if there is one; a failure to close changes nothing we could act on."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(slots=True)
class OpenSession:
    """A session whose lease this store holds, with its journal open."""

    client_id: str
    paths: Paths
    #: Whether to fsync (the store's ``fsync`` setting).
    sync: bool
    #: The journal, open for reading and writing; None: no journal yet.
    fd: int | None
    #: Where the next record goes: the end of the last one written (synced or not).
    size: int
    #: Size of the journal right after it was last rewritten (0: unknown).
    snapshot_size: int
    #: What the journal replays to, with the messages' bytes left in the file.
    index: Index
    created_at: float
    last_access: float
    #: The last access time the journal records.
    persisted_access: float
    ttl: float | None
    #: An append failed and could not be rolled back: the file is not what the index says.
    broken: bool = False
    #: Set when a sync of the journal failed: what the disk holds is unknown (see ``writer``).
    sync_error: StoreError | None = None
    #: Records handed to the syncer (written by the thread that hands them over), and those
    #: it synced (or failed) and settled (written by the syncer, under its lock); equal when
    #: nothing of this session waits for a sync.
    submitted: int = 0
    settled: int = 0
    #: Of those, how many the syncer thread has yet to settle (the rest go through the event
    #: loop's AIO, ``loopsync``): one session's records are synced on one path at a time.
    threaded: int = 0
    #: Where the file ends: past :attr:`size` lie preallocated zeros (fsync on; see append).
    allocated: int = 0

    @classmethod
    def open(
        cls, client_id: str, paths: Paths, now: float, sync: bool, quarantine: Quarantine
    ) -> OpenSession:
        """Read (and repair) the journal; a session without a journal if there is none."""
        try:
            fd = os.open(paths.journal, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return cls(client_id, paths, sync, None, 0, 0, Index(client_id), now, now, now, None)
        except OSError as exc:
            raise StoreError(f"cannot open {paths.journal}: {exc}") from exc
        try:
            parsed = _parse(fd, paths, client_id, sync, quarantine)
        except BaseException:
            close_fd(fd)
            raise
        last_access = recorded_access(parsed)
        index = parsed.index
        assert index is not None
        # A journal that is mostly live data counts as freshly rewritten, so reopening does
        # not rewrite it on the first append; one that is mostly dead weight (more than twice
        # its live bytes) gets the baseline 0 and is compacted by that first append.
        mostly_live = parsed.good_end <= 2 * index.live_bytes()
        # A zero tail stays preallocated for the appends to come; a torn one was cut.
        allocated = parsed.size if parsed.zero_tail and parsed.migrated is None else 0
        session = cls(
            client_id,
            paths,
            sync,
            fd,
            parsed.good_end,
            parsed.good_end if mostly_live else 0,
            index,
            parsed.created_at,
            last_access,
            last_access,
            parsed.ttl,
            allocated=allocated,
        )
        if parsed.migrated is not None:
            # The index describes the migrated bytes, not the file: rewrite from those.
            migrated = parsed.migrated
            source = snapshot.index_source(reader(None, 0, migrated), len(migrated), index)
            try:
                session.rewrite(source, index.meta, index.last_seq, now)
            except BaseException:
                if session.fd == fd:
                    close_fd(fd)
                raise
        return session

    def expired(self, now: float) -> bool:
        """True once the session expired (by its last access as this store knows it)."""
        return is_expired(self.last_access, self.ttl, now)

    def close(self) -> None:
        """Close the journal (the session stays on disk), without its preallocated zeros."""
        fd, self.fd = self.fd, None
        # Unsynced: if the cut is lost, the zeros are read as free space anyway. A journal
        # that is broken or whose sync failed is left as it is: what it holds is unknown.
        healthy = not self.broken and self.sync_error is None
        if fd is not None and healthy and self.allocated > self.size:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.size)
        close_fd(fd)

    def append(self, record: bytes) -> None:
        """Write one record after the last one (no sync: see :meth:`make_durable`).

        With fsync on, a record that passes the end of the file is followed by zeros up to the
        next multiple of ``sizes.PREALLOC_CHUNK`` (a second ``pwrite``, once per chunk), which
        the records after it overwrite: an ``fdatasync`` of those has no file size to commit
        (the journal's module docstring says how a reader finds the end). The zeros are
        written after the record, so a record is either written whole (and the append has
        succeeded: zeros that do not fit on the disk only leave the file unextended) or cut
        off again.

        On failure (StoreError: a full disk, an I/O error) the file is cut back to the end of
        the last record written before; if even that fails, :attr:`broken` is set and the store
        must forget this session, so that the next operation reads the file again and repairs
        its tail under the lease.
        """
        fd = self.fd
        assert fd is not None
        at = self.size
        view = memoryview(record)
        try:
            while view:
                n = os.pwrite(fd, view, at)
                if not n:
                    raise OSError(f"write made no progress at offset {at}")
                view = view[n:]
                at += n
        except OSError as exc:
            self._undo_append()
            raise StoreError(f"could not append to {self.paths.journal}: {exc}") from exc
        self.size = at
        if self.sync and at > self.allocated:
            self._preallocate(fd, at)

    def _preallocate(self, fd: int, end: int) -> None:
        chunk = sizes.PREALLOC_CHUNK
        try:
            written = os.pwrite(fd, bytes(chunk - end % chunk), end)
        except OSError as exc:
            # Only a missed speed-up: the record is whole, and its sync commits the file size.
            logger.debug("could not preallocate %s: %s", self.paths.journal, exc)
            written = 0
        self.allocated = end + written

    def cut_last(self, length: int) -> None:
        """Cut off the last record appended (``length`` bytes), which was never synced nor
        indexed: its sync could not be started. Sets :attr:`broken` if the file cannot be cut.
        """
        self.size -= length
        self._undo_append()

    def _undo_append(self) -> None:
        # Nothing half-written may stay in the middle of the journal. No sync here: the cut
        # bytes were never synced, so until the next sync (which covers the cut) a power cut
        # shows the old end or a torn tail after it, and a torn tail is discarded by load.
        assert self.fd is not None
        self.allocated = self.size  # the preallocated zeros go too: the disk may be full
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            logger.error("could not roll back %s: %s", self.paths.journal, exc)
            self.broken = True

    def make_durable(self) -> StoreError | None:
        """Sync the journal: every record written so far is durable when this returns None.

        On failure the session is poisoned (:attr:`sync_error`, and for the whole process
        ``writer.mark_failed_sync``) and the error is returned; so is the first error again
        on every later call, whatever the disk would say now.
        """
        if self.sync_error is not None:
            return self.sync_error
        journal = self.paths.journal
        fd = self.fd
        try:
            if fd is None:
                raise OSError(f"{journal} is not open")
            datasync_fd(fd)
        except OSError as exc:
            return self.sync_failed(exc)
        return None

    def sync_failed(self, exc: OSError) -> StoreError:
        """Poison the session after a failed sync (see :meth:`make_durable`); the error."""
        if self.sync_error is not None:
            return self.sync_error
        journal = self.paths.journal
        logger.error("could not sync %s: %s; the session is unusable here", journal, exc)
        error = StoreError(
            f"could not sync {journal}: {exc}; what the disk holds is unknown, so nothing "
            "more is written to it in this process (restart it, or delete the session)"
        )
        error.__cause__ = exc
        self.sync_error = error
        mark_failed_sync(journal)
        return error

    def rewrite(
        self, messages: Iterator[snapshot.Placed], meta: SessionState, last_seq: int, now: float
    ) -> None:
        """Atomically replace the journal with a snapshot (create/compact/save/migrate).

        ``messages`` (ascending) are streamed into the new file: compaction reads them from
        the old journal as it goes, so the session is never held in memory whole. ``meta`` and
        ``last_seq`` give the rest of the session.
        """
        paths = self.paths
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            # Created 0600: the mode applies before any byte is written.
            fd = os.open(paths.tmp, flags, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create {paths.tmp}: {exc}") from exc
        try:
            index, size = snapshot.write_snapshot(
                fd,
                self.client_id,
                self.created_at,
                now,
                self.ttl,
                messages,
                meta,
                last_seq,
                self.sync,
            )
            os.replace(paths.tmp, paths.journal)
        except BaseException as exc:
            close_fd(fd)
            with contextlib.suppress(OSError):
                os.remove(paths.tmp)
            if isinstance(exc, OSError):
                raise StoreError(f"could not rewrite {paths.journal}: {exc}") from exc
            raise
        # The new file is in place: adopt it before the directory fsync, so that whatever
        # happens next this session's view matches the disk.
        old, self.fd = self.fd, fd
        self.size = self.snapshot_size = self.allocated = size
        self.index = index
        self.last_access = self.persisted_access = now
        close_fd(old)
        if self.sync:
            directory = os.path.dirname(paths.journal)
            try:
                fsync_directory(directory)
            except OSError as exc:
                raise StoreError(f"could not fsync {directory}: {exc}") from exc

    def append_metadata(self, now: float, *, ttl: bool) -> None:
        """Record the last access (and with ``ttl``, the TTL) in the journal."""
        if self.fd is None:
            index = self.index  # no journal yet: the session is empty but for metadata
            self.rewrite(iter(()), index.meta, index.last_seq, now)
            return
        # The journal writes "never" as 0.
        body = encode_body(b"", last_access=now, ttl=(self.ttl or 0.0) if ttl else None)
        self.append(encode_record(body))
        if self.sync and (error := self.make_durable()) is not None:
            raise fresh(error)
        self.persisted_access = now


def _parse(fd: int, paths: Paths, client_id: str, sync: bool, quarantine: Quarantine) -> Parsed:
    """Parse the open journal, cutting a torn tail; a damaged one is quarantined."""
    try:
        parsed = parse_fd(fd, True)
        if parsed.client_id != client_id:
            raise Damaged(f"journal belongs to client id {parsed.client_id!r}")
    except Damaged as damaged:
        close_fd(fd)
        raise quarantine(
            paths.journal, damaged.reason, newer_version=damaged.newer_version
        ) from None
    if parsed.torn:
        logger.warning(
            "%s: discarding %d bytes of a torn final record (a write interrupted by a "
            "crash); the batch it held was never acknowledged",
            paths.journal,
            parsed.size - parsed.good_end,
        )
        # A migrated journal is replaced as a whole later; cutting the old file at an
        # offset of the migrated bytes would damage it.
        if parsed.migrated is None:
            os.ftruncate(fd, parsed.good_end)
            if sync:
                fsync_fd(fd)
    return parsed
