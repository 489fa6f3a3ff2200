"""A crash-safe session store: one append-only journal file per session.

Durability model
    :meth:`FileStore.apply` encodes the whole batch into ONE record, appends it with one
    ``write`` and makes it durable with ONE ``fsync`` (group commit), then returns; write and
    fsync run back to back in a single worker-thread hop. A record carries its length and a
    CRC32, so a crash at any byte leaves either the complete record (the batch happened) or a
    torn tail that :meth:`FileStore.load` discards (it did not). While a session is open the
    store keeps its replayed state in memory: ``load`` answers from it (read-after-write) and
    compaction snapshots it without re-reading the file.
    Creating a journal, compacting it and :meth:`FileStore.save` write a complete new file to a
    temporary name, fsync it, ``os.replace`` it over the journal and fsync the directory: a crash
    leaves the old file or the new one, never a mix. Those three cost two fsyncs (file and
    directory) instead of one; a plain append costs exactly one.

Journal format (version 1, little-endian)::

    header   4s magic b"MQPJ", H format version, H flags (0), d created_at (Unix time),
             I client id length, client id (UTF-8), I CRC32 of the header bytes before it
    record*  B marker 0xA5, I body length, I CRC32 of (length field + body), body
    body     B flags, [d last_access if flags & 1], [d ttl seconds, 0 = never, if flags & 2],
             operations (:mod:`mqtt_persist.stores.serialization`), possibly none

Magic and version sit at fixed offsets in every version, so a newer file is recognised
before anything else is interpreted. Older versions go through :data:`_MIGRATIONS`.

Metadata lives in the journal itself: ``created_at`` in the header (never rewritten; compaction
copies it), ``last_access`` and the TTL in record bodies, so metadata is exactly as atomic and
as checked as the operations, with no second file to keep consistent. ``expires_at`` is derived
as ``last_access + ttl``. ``last_access`` is updated in memory by every :meth:`~FileStore.load`
and :meth:`~FileStore.apply`; it reaches the disk piggybacked on the next ``apply`` record once
the persisted value is ``access_write_interval`` seconds old (8 extra bytes, no extra I/O), and
on :meth:`~FileStore.release`/:meth:`~FileStore.close`. A crash can therefore lose up to
``access_write_interval`` seconds of last access, which can only make a session expire that
much earlier than it would have.

Damage
    A damaged final record (short, or failing its CRC) is what a crash mid-append leaves: it is
    dropped and the file truncated to the last good record (logged as a warning). Damage with
    valid records after it, a bad header, a bad magic or a newer version cannot come from a
    crash: the file is renamed to ``<name>.corrupt-<UTC timestamp>`` (never deleted) and
    :class:`~mqtt_persist.errors.SessionCorrupt` (or
    :class:`~mqtt_persist.errors.UnsupportedFormatVersion`) names both paths.

Files (directory created 0700, every file created 0600): for a client id, ``<base>.journal``,
``<base>.lock`` (the lease, ``flock``-ed) and ``<base>.tmp`` (a rewrite in progress), where
``<base>`` is the client id with everything but ``[A-Za-z0-9_-]`` replaced, cut to 40
characters, plus 32 hex digits of its SHA-256: safe for any Unicode, ``/``, ``..`` or very long
ids, distinct on case-insensitive file systems, and still recognisable. The real client id is
stored in the header.

Leases
    :meth:`FileStore.acquire` holds ``flock(LOCK_EX | LOCK_NB)`` on the session's lock file until
    :meth:`~FileStore.release`/:meth:`~FileStore.close`; a process that dies loses it with its
    file descriptors. Every operation that reads with intent to repair or writes a session
    (``load``, ``apply``, ``save``, ``update_ttl``) takes the lease implicitly when this store
    does not hold it yet, and keeps it until ``release``/``close``, so two processes never
    write one journal and one never truncates a tail the other is still writing;
    :meth:`~FileStore.delete` and :meth:`~FileStore.cleanup_expired` take it only for the
    removal. :meth:`~FileStore.list_sessions` and :meth:`~FileStore.exists` only read.
    :meth:`~FileStore.cleanup_expired` spares sessions a client holds. A lock file is removed
    (while still locked, see ``_lock``) when its session has no journal left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiofiles
import aiofiles.os
from aiofiles.threadpool.binary import AsyncFileIO

from mqtt_persist.errors import (
    SessionCorrupt,
    SessionExpired,
    SessionLocked,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import Operation, SessionState
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.serialization import DecodeError, decode_operations, encode_operations

__all__ = ["FORMAT_VERSION", "MAGIC", "FileStore"]

logger = logging.getLogger(__name__)

#: First bytes of every journal file.
MAGIC = b"MQPJ"
#: The journal format this module writes.
FORMAT_VERSION = 1

_T = TypeVar("_T")

# The preamble (magic, version) is the same in every version; the rest may change with it.
_PREAMBLE = struct.Struct("<4sH")
_HEADER = struct.Struct("<4sHHdI")  # magic, version, flags, created_at, client id length
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_RECORD = struct.Struct("<BII")  # marker, body length, CRC32 of (length field + body)
_RECORD_MARK = 0xA5
_RECORD_MARK_BYTE = bytes((_RECORD_MARK,))
# Bodies never exceed this: the length field is a uint32.
_MAX_BODY = 0xFFFFFFFF

_BODY_ACCESS = 0x01
_BODY_TTL = 0x02
_BODY_KNOWN = _BODY_ACCESS | _BODY_TTL

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")

#: Upgrades of whole journal files, keyed by the version they upgrade FROM: each returns the
#: file's bytes in the next version. Empty while version 1 is the only version; when version 2
#: arrives, add ``1: _migrate_1_to_2``. A migrated journal is rewritten in the current format
#: the first time it is opened for writing.
_MIGRATIONS: dict[int, Callable[[bytes], bytes]] = {}


# --- the on-disk format (pure functions; the parsing ones run in a worker thread) ------------


class _Damaged(Exception):
    """The journal cannot be read: why, and whether a newer version wrote it."""

    def __init__(self, reason: str, *, newer_version: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.newer_version = newer_version


@dataclass(slots=True)
class _Parsed:
    client_id: str
    created_at: float
    #: None when the operations were not decoded (metadata-only parse).
    state: SessionState | None
    last_access: float | None
    ttl: float | None
    #: Offset just past the last valid record: where the file should end.
    good_end: int
    #: Bytes after ``good_end`` are a torn final record.
    torn: bool
    #: The file is in an older format and was migrated in memory.
    migrated: bool


def _encode_header(client_id: str, created_at: float) -> bytes:
    client_id_bytes = client_id.encode("utf-8", "surrogatepass")
    head = (
        _HEADER.pack(MAGIC, FORMAT_VERSION, 0, created_at, len(client_id_bytes)) + client_id_bytes
    )
    return head + _U32.pack(zlib.crc32(head))


def _encode_record(body: bytes) -> bytes:
    if len(body) > _MAX_BODY:
        raise StoreError(f"a batch of {len(body)} bytes does not fit in one journal record")
    length = _U32.pack(len(body))
    return _RECORD.pack(_RECORD_MARK, len(body), zlib.crc32(body, zlib.crc32(length))) + body


def _encode_body(
    ops_bytes: bytes, *, last_access: float | None = None, ttl: float | None = None
) -> bytes:
    flags = 0
    meta = b""
    if last_access is not None:
        flags |= _BODY_ACCESS
        meta += _F64.pack(last_access)
    if ttl is not None:
        flags |= _BODY_TTL
        meta += _F64.pack(ttl)
    return bytes((flags,)) + meta + ops_bytes


def _record_at(data: bytes, offset: int) -> int | None:
    """End offset of the valid record starting at ``offset``, or None if there is none."""
    body_start = offset + _RECORD.size
    if body_start > len(data):
        return None
    mark, length, crc = _RECORD.unpack_from(data, offset)
    end: int = body_start + length
    if mark != _RECORD_MARK or length == 0 or end > len(data):
        return None
    if zlib.crc32(data[body_start:end], zlib.crc32(data[offset + 1 : offset + 5])) != crc:
        return None
    return end


def _valid_record_after(data: bytes, offset: int) -> int | None:
    """Offset of the first valid record starting after ``offset``: damage is not a torn tail."""
    position = data.find(_RECORD_MARK_BYTE, offset + 1)
    while position != -1:
        if _record_at(data, position) is not None:
            return position
        position = data.find(_RECORD_MARK_BYTE, position + 1)
    return None


def _migrate(data: bytes, version: int) -> bytes:
    while version < FORMAT_VERSION:
        migration = _MIGRATIONS.get(version)
        if migration is None:
            raise _Damaged(f"format version {version} is not one this library ever wrote")
        data = migration(data)
        if len(data) < _PREAMBLE.size or data[:4] != MAGIC:
            raise _Damaged(f"migration from format version {version} produced no journal")
        new_version = _PREAMBLE.unpack_from(data, 0)[1]
        if new_version <= version:
            raise _Damaged(f"migration from format version {version} did not advance it")
        version = new_version
    return data


def _parse_journal(data: bytes, *, decode: bool = True) -> _Parsed:
    """Replay a journal file's bytes. Raises :class:`_Damaged` for anything but a torn tail."""
    if len(data) < _PREAMBLE.size:
        raise _Damaged("file too short for a journal header")
    magic, version = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise _Damaged(f"bad magic {magic!r}: not a session journal")
    if version > FORMAT_VERSION:
        raise _Damaged(
            f"journal format version {version} is newer than this library's {FORMAT_VERSION}",
            newer_version=True,
        )
    migrated = version < FORMAT_VERSION
    if migrated:
        data = _migrate(data, version)
    if len(data) < _HEADER.size:
        raise _Damaged("file too short for a journal header")
    magic, version, flags, created_at, id_length = _HEADER.unpack_from(data, 0)
    if flags:
        raise _Damaged(f"unknown header flags 0x{flags:04x}")
    id_end = _HEADER.size + id_length
    if id_end + _U32.size > len(data):
        raise _Damaged("journal header truncated")
    if zlib.crc32(data[:id_end]) != _U32.unpack_from(data, id_end)[0]:
        raise _Damaged("journal header checksum mismatch")
    try:
        client_id = data[_HEADER.size : id_end].decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise _Damaged("client id in the header is not UTF-8") from exc

    state = SessionState(client_id) if decode else None
    last_access: float | None = None
    ttl: float | None = None
    offset = id_end + _U32.size
    size = len(data)
    while offset < size:
        end = _record_at(data, offset)
        if end is None:
            if (later := _valid_record_after(data, offset)) is not None:
                raise _Damaged(
                    f"damaged record at offset {offset} followed by a valid one at {later}"
                )
            return _Parsed(client_id, created_at, state, last_access, ttl, offset, True, migrated)
        body_start = offset + _RECORD.size
        body_flags = data[body_start]
        if body_flags & ~_BODY_KNOWN:
            raise _Damaged(f"record at offset {offset} has unknown flags 0x{body_flags:02x}")
        position = body_start + 1
        try:
            if body_flags & _BODY_ACCESS:
                last_access = _F64.unpack_from(data, position)[0]
                position += _F64.size
            if body_flags & _BODY_TTL:
                ttl = _F64.unpack_from(data, position)[0] or None
                position += _F64.size
        except struct.error as exc:
            raise _Damaged(f"record at offset {offset} is too short for its metadata") from exc
        if position > end:
            raise _Damaged(f"record at offset {offset} is too short for its metadata")
        if state is not None and position < end:
            try:
                ops = decode_operations(data[position:end])
            except DecodeError as exc:
                raise _Damaged(f"record at offset {offset}: {exc}") from exc
            state.apply_all(ops)
        offset = end
    return _Parsed(client_id, created_at, state, last_access, ttl, size, False, migrated)


# --- small blocking helpers, each run as ONE worker-thread hop ------------------------------


def _fsync_fd(fd: int) -> None:
    # macOS's fsync() stops at the drive's cache; F_FULLFSYNC reaches the medium.
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass
    os.fsync(fd)


def _write_and_sync(fd: int, data: bytes, sync: bool) -> None:
    """Write all of ``data`` at the file's position, then fsync: a commit in ONE thread hop.

    The files are unbuffered (``buffering=0``), so writing to the descriptor directly cannot
    reorder anything behind a Python-level buffer.
    """
    view = memoryview(data)
    written = 0
    while written < len(data):
        n = os.write(fd, view[written:])
        if not n:
            raise OSError(f"write made no progress after {written} of {len(data)} bytes")
        written += n
    if sync:
        _fsync_fd(fd)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _private_opener(path: str, flags: int) -> int:
    # The mode applies at creation, before any byte is written; umask can only narrow it.
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _lock(path: str) -> int | None:
    """``flock`` the lock file; its descriptor, or None while someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # A releaser may have unlinked the file between our open and our flock: then we locked
        # an orphan inode that nobody else will ever see, so start over on the current file.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        locked = os.fstat(fd)
        if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
            return fd
        os.close(fd)


def _unlock(fd: int, path: str, remove: bool) -> None:
    """Release a lock; ``remove`` unlinks the file first, while it is still held (see _lock)."""
    try:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_and_parse(path: str, decode: bool) -> _Parsed | _Damaged | None:
    """Lock-free read-only parse for listing: None if the file vanished."""
    data = _read_file(path)
    if data is None:
        return None
    try:
        return _parse_journal(data, decode=decode)
    except _Damaged as damaged:
        return damaged


_afsync = aiofiles.os.wrap(_fsync_fd)
_awrite_and_sync = aiofiles.os.wrap(_write_and_sync)
_afsync_directory = aiofiles.os.wrap(_fsync_directory)
_alock = aiofiles.os.wrap(_lock)
_aunlock = aiofiles.os.wrap(_unlock)
_aparse = aiofiles.os.wrap(_parse_journal)
_aread_and_parse = aiofiles.os.wrap(_read_and_parse)


@contextlib.contextmanager
def _io_errors() -> Iterator[None]:
    """Report the file system's failures as the store's."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"session store I/O failed: {exc}") from exc


async def _run_to_completion(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to its end even if the caller is cancelled, then honour the cancellation.

    File I/O happens in worker threads that cannot be interrupted; abandoning it half way would
    leave this store's view of a journal (its size, its cached state) out of step with the file.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.warning("session store operation failed after cancellation: %r", exc)
        raise asyncio.CancelledError
    try:
        return task.result()
    except OSError as exc:
        raise StoreError(f"session store I/O failed: {exc}") from exc


# --- the store --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Paths:
    journal: str
    lock: str
    tmp: str


@dataclass(slots=True)
class _Lease:
    fd: int
    #: Taken by acquire() (a second acquire is refused) rather than implicitly.
    explicit: bool


@dataclass(slots=True)
class _Session:
    """An open session: exists only while this store holds its lease."""

    client_id: str
    paths: _Paths
    #: Open for reading and writing, positioned at its end; None: no journal on disk yet.
    file: AsyncFileIO | None
    size: int
    #: Size of the journal right after it was last rewritten (0: unknown).
    snapshot_size: int
    state: SessionState
    created_at: float
    last_access: float
    #: The last access time the journal records.
    persisted_access: float
    ttl: float | None


def _recorded_access(parsed: _Parsed) -> float:
    return parsed.last_access if parsed.last_access is not None else parsed.created_at


def _expired(last_access: float, ttl: float | None, now: float) -> bool:
    return ttl is not None and now >= last_access + ttl


class FileStore:
    """A :class:`~mqtt_persist.stores.base.SessionStore` keeping one journal file per session.

    See the module documentation for the format and the guarantees. ``fsync=False`` skips every
    fsync (tests, throw-away data): a process crash still loses nothing, a power cut may.
    ``compact_threshold_bytes``: a journal is rewritten as a snapshot when an append would grow
    it past ``max(compact_threshold_bytes, 4 * its size after the last rewrite)``.
    ``access_write_interval``: how stale the last access recorded on disk may get (seconds).
    ``clock`` returns the current Unix time (for last access and expiry).
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
        self._opened = False
        self._sessions: dict[str, _Session] = {}
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def directory(self) -> Path:
        """Where the journals live."""
        return self._directory

    def journal_path(self, client_id: str) -> Path:
        """The journal file of ``client_id`` (whether or not it exists)."""
        return Path(self._paths(client_id).journal)

    async def __aenter__(self) -> FileStore:
        """``async with FileStore(...) as store``: open on entry."""
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close on exit (records last accesses, releases leases)."""
        await self.close()

    # --- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _file_base(client_id: str) -> str:
        digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        readable = _UNSAFE_NAME_CHARS.sub("_", client_id[:40])
        return f"{readable}-{digest}" if readable else digest

    def _paths(self, client_id: str) -> _Paths:
        base = os.path.join(self._directory, self._file_base(client_id))
        return _Paths(base + ".journal", base + ".lock", base + ".tmp")

    def _lock_for(self, client_id: str) -> asyncio.Lock:
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        return lock

    async def _sync_directory(self) -> None:
        if self._fsync:
            await _afsync_directory(str(self._directory))

    async def _take_lease(self, client_id: str, *, explicit: bool) -> None:
        await self.open()
        path = self._paths(client_id).lock
        fd = await _alock(path)
        if fd is None:
            raise SessionLocked(
                f"session {client_id!r} is held by another process or store (lock file {path})"
            )
        self._leases[client_id] = _Lease(fd, explicit)

    async def _drop_lease(self, client_id: str) -> None:
        lease = self._leases.pop(client_id, None)
        if lease is not None:
            paths = self._paths(client_id)
            # A lock file without a journal is litter; one with a journal stays for next time.
            remove = not await aiofiles.os.path.exists(paths.journal)
            await _aunlock(lease.fd, paths.lock, remove)

    async def _quarantine(self, path: str, reason: str, *, newer_version: bool) -> SessionCorrupt:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = f"{path}.corrupt-{stamp}"
        suffix = 0
        while await aiofiles.os.path.exists(target):
            suffix += 1
            target = f"{path}.corrupt-{stamp}-{suffix}"
        try:
            await aiofiles.os.rename(path, target)
            await self._sync_directory()
        except OSError as exc:
            logger.error("could not quarantine damaged journal %s: %s", path, exc)
            return SessionCorrupt(f"{reason}; moving it aside failed: {exc}", location=path)
        logger.error("damaged session journal %s (%s) moved to %s", path, reason, target)
        error = UnsupportedFormatVersion if newer_version else SessionCorrupt
        return error(reason, location=path, quarantined_to=target)

    async def _open_session(self, client_id: str) -> _Session:
        """Read (and repair) the journal into a session; needs the lease."""
        paths = self._paths(client_id)
        now = self._clock()
        try:
            f = await aiofiles.open(paths.journal, "r+b", buffering=0)
        except FileNotFoundError:
            return _Session(
                client_id, paths, None, 0, 0, SessionState(client_id), now, now, now, None
            )
        except OSError as exc:
            raise StoreError(f"cannot open {paths.journal}: {exc}") from exc
        try:
            data = await f.readall()
            try:
                parsed = await _aparse(data)
                if parsed.client_id != client_id:
                    raise _Damaged(f"journal belongs to client id {parsed.client_id!r}")
            except _Damaged as damaged:
                await f.close()
                raise await self._quarantine(
                    paths.journal, damaged.reason, newer_version=damaged.newer_version
                ) from None
            assert parsed.state is not None
            if parsed.torn:
                logger.warning(
                    "%s: discarding %d bytes of a torn final record (a write interrupted by a "
                    "crash); the batch it held was never acknowledged",
                    paths.journal,
                    len(data) - parsed.good_end,
                )
                await f.truncate(parsed.good_end)
                await f.seek(parsed.good_end)
                if self._fsync:
                    await _afsync(f.fileno())
        except BaseException:
            if not f.closed:
                await f.close()
            raise
        last_access = _recorded_access(parsed)
        session = _Session(
            client_id,
            paths,
            f,
            parsed.good_end,
            0,
            parsed.state,
            parsed.created_at,
            last_access,
            last_access,
            parsed.ttl,
        )
        if parsed.migrated:
            await self._rewrite(session, session.state, self._clock())
        return session

    async def _session(self, client_id: str) -> _Session:
        """The open session of ``client_id``, taking the lease and reading it if needed."""
        session = self._sessions.get(client_id)
        if session is None:
            if client_id not in self._leases:
                await self._take_lease(client_id, explicit=False)
            session = await self._open_session(client_id)
            self._sessions[client_id] = session
        return session

    async def _append(self, session: _Session, record: bytes) -> None:
        """Append one record and fsync: the commit point of a batch."""
        f = session.file
        assert f is not None
        try:
            await _awrite_and_sync(f.fileno(), record, self._fsync)
        except OSError as exc:
            await self._undo_append(session)
            raise StoreError(f"could not append to {session.paths.journal}: {exc}") from exc

    async def _undo_append(self, session: _Session) -> None:
        # Cut the file back to its last committed record so nothing half-written stays in the
        # middle of the journal; if even that fails, forget the session so the next operation
        # re-reads the file and repairs its tail under the lease.
        f = session.file
        assert f is not None
        try:
            await f.truncate(session.size)
            await f.seek(session.size)
            if self._fsync:
                await _afsync(f.fileno())
        except OSError as exc:
            logger.error("could not roll back %s: %s", session.paths.journal, exc)
            self._sessions.pop(session.client_id, None)
            with contextlib.suppress(OSError):
                await f.close()

    async def _rewrite(self, session: _Session, state: SessionState, now: float) -> None:
        """Atomically replace the journal with a snapshot of ``state`` (create/compact/save)."""
        paths = session.paths
        body = _encode_body(
            encode_operations(state.to_operations()),
            last_access=now,
            ttl=session.ttl if session.ttl is not None else 0.0,
        )
        data = _encode_header(session.client_id, session.created_at) + _encode_record(body)
        try:
            f = await aiofiles.open(paths.tmp, "w+b", buffering=0, opener=_private_opener)
        except OSError as exc:
            raise StoreError(f"cannot create {paths.tmp}: {exc}") from exc
        try:
            await _awrite_and_sync(f.fileno(), data, self._fsync)
            await aiofiles.os.replace(paths.tmp, paths.journal)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                await f.close()
            with contextlib.suppress(OSError):
                await aiofiles.os.remove(paths.tmp)
            if isinstance(exc, OSError):
                raise StoreError(f"could not rewrite {paths.journal}: {exc}") from exc
            raise
        # The new file is in place: adopt it before the directory fsync, so that whatever
        # happens next this store's view matches the disk.
        old, session.file = session.file, f
        session.size = session.snapshot_size = len(data)
        session.state = state
        session.last_access = session.persisted_access = now
        if old is not None:
            with contextlib.suppress(OSError):
                await old.close()
        try:
            await self._sync_directory()
        except OSError as exc:
            raise StoreError(f"could not fsync {self._directory}: {exc}") from exc

    async def _append_metadata(self, session: _Session, now: float, *, ttl: bool) -> None:
        if session.file is None:
            await self._rewrite(session, session.state, now)
            return
        body = _encode_body(
            b"",
            last_access=now,
            ttl=(session.ttl or 0.0) if ttl else None,
        )
        record = _encode_record(body)
        await self._append(session, record)
        session.size += len(record)
        session.persisted_access = now

    async def _remove_journal(self, client_id: str) -> bool:
        """Delete the journal (and a stale temp file); True if there was one."""
        session = self._sessions.pop(client_id, None)
        if session is not None and session.file is not None:
            with contextlib.suppress(OSError):
                await session.file.close()
        paths = self._paths(client_id)
        removed = []
        for path in (paths.journal, paths.tmp):
            try:
                await aiofiles.os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"could not remove {path}: {exc}") from exc
        if removed:
            # Durably gone: a removed session must not come back after a power cut.
            await self._sync_directory()
        return paths.journal in removed

    async def _release_locked(self, client_id: str) -> None:
        session = self._sessions.pop(client_id, None)
        if session is not None and session.file is not None:
            try:
                if session.last_access > session.persisted_access:
                    await self._append_metadata(session, session.last_access, ttl=False)
            except (OSError, StoreError) as exc:
                logger.warning("%s: could not record last access: %s", session.paths.journal, exc)
            finally:
                with contextlib.suppress(OSError):
                    await session.file.close()
        await self._drop_lease(client_id)

    # --- SessionStore -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory (mode 0700) if needed. Idempotent; other methods call it."""
        if self._opened:
            return
        directory = str(self._directory)
        try:
            if not await aiofiles.os.path.isdir(directory):
                await aiofiles.os.makedirs(directory, mode=0o700, exist_ok=True)
                if self._fsync:
                    await _afsync_directory(str(self._directory.parent))
            mode = (await aiofiles.os.stat(directory)).st_mode
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

    async def close(self) -> None:
        """Record last accesses, close every journal and release every lease. Idempotent."""
        failures: list[StoreError] = []
        for client_id in list(self._leases.keys() | self._sessions.keys()):
            async with self._lock_for(client_id):
                try:
                    await _run_to_completion(self._release_locked(client_id))
                except StoreError as exc:
                    # Keep going: every other lease must still be released.
                    logger.error("closing session %r failed: %s", client_id, exc)
                    failures.append(exc)
        self._opened = False
        if failures:
            raise failures[0]

    async def acquire(self, client_id: str) -> None:
        """Take the lease: ``flock`` on the session's lock file, held until release/close.

        Raises :class:`~mqtt_persist.errors.SessionLocked` when another process or another store
        holds it, or when this store already acquired it.
        """
        async with self._lock_for(client_id):
            lease = self._leases.get(client_id)
            if lease is not None:
                if lease.explicit:
                    raise SessionLocked(f"session {client_id!r} is already acquired by this store")
                lease.explicit = True
                return
            await _run_to_completion(self._take_lease(client_id, explicit=True))

    async def release(self, client_id: str) -> None:
        """Record the last access, close the journal and give the lease back. Idempotent."""
        async with self._lock_for(client_id):
            await _run_to_completion(self._release_locked(client_id))

    async def load(self, client_id: str) -> SessionState | None:
        """Read the session (repairing a torn tail), or None; takes the lease if not held.

        Raises :class:`~mqtt_persist.errors.SessionExpired` (the session is removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (the journal is quarantined) or
        :class:`~mqtt_persist.errors.SessionLocked` (another process holds the session).
        """
        async with self._lock_for(client_id):
            return await _run_to_completion(self._load_locked(client_id))

    async def _load_locked(self, client_id: str) -> SessionState | None:
        if client_id not in self._sessions:
            await self.open()
            if not await aiofiles.os.path.exists(self._paths(client_id).journal):
                return None
        session = await self._session(client_id)
        if session.file is None:
            return None
        now = self._clock()
        if _expired(session.last_access, session.ttl, now):
            await self._remove_journal(client_id)
            raise SessionExpired(f"session {client_id!r} expired and was removed")
        session.last_access = now
        return session.state.copy()

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot (atomic file replace)."""
        client_id = state.client_id
        snapshot = state.copy()
        async with self._lock_for(client_id):
            await _run_to_completion(self._save_locked(client_id, snapshot))

    async def _save_locked(self, client_id: str, snapshot: SessionState) -> None:
        try:
            session = await self._session(client_id)
        except SessionCorrupt:
            # The damaged journal was moved aside; the snapshot replaces it anyway.
            session = await self._session(client_id)
        await self._rewrite(session, snapshot, self._clock())

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Append ``ops`` as one record with one write and one fsync; durable on return.

        The first batch of a new session, and a batch that triggers compaction, replace the
        file instead (two fsyncs). An empty batch only counts as an access. Expiry is not
        checked: the caller holds the session.
        """
        ops_bytes = encode_operations(ops)
        async with self._lock_for(client_id):
            await _run_to_completion(self._apply_locked(client_id, ops, ops_bytes))

    async def _apply_locked(
        self, client_id: str, ops: Sequence[Operation], ops_bytes: bytes
    ) -> None:
        if not ops:
            if (session := self._sessions.get(client_id)) is not None:
                session.last_access = self._clock()
            return
        session = await self._session(client_id)
        now = self._clock()
        record_access = now - session.persisted_access >= self._access_write_interval
        record = _encode_record(_encode_body(ops_bytes, last_access=now if record_access else None))
        limit = max(self._compact_threshold, 4 * session.snapshot_size)
        if session.file is None or session.size + len(record) > limit:
            state = session.state.copy()
            state.apply_all(list(ops))
            await self._rewrite(session, state, now)
            return
        await self._append(session, record)
        session.size += len(record)
        session.state.apply_all(list(ops))
        session.last_access = now
        if record_access:
            session.persisted_access = now

    async def delete(self, client_id: str) -> None:
        """Remove the session's journal (quarantined files stay). Idempotent.

        A lease acquired with :meth:`acquire` stays held; otherwise the lease is taken for the
        removal only. Raises :class:`~mqtt_persist.errors.SessionLocked` when another process
        holds the session.
        """
        async with self._lock_for(client_id):
            await _run_to_completion(self._delete_locked(client_id))

    async def _delete_locked(self, client_id: str) -> None:
        await self.open()
        paths = self._paths(client_id)
        lease = self._leases.get(client_id)
        if lease is None:
            if not await aiofiles.os.path.exists(paths.journal):
                return
            await self._take_lease(client_id, explicit=False)
            lease = self._leases[client_id]
        try:
            await self._remove_journal(client_id)
        finally:
            if not lease.explicit:
                await self._drop_lease(client_id)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only; takes no lease).

        A damaged journal counts as existing: :meth:`load` reports (and quarantines) it.
        """
        session = self._sessions.get(client_id)
        if session is not None:
            return session.file is not None and not _expired(
                session.last_access, session.ttl, self._clock()
            )
        await self.open()
        with _io_errors():
            result = await _aread_and_parse(self._paths(client_id).journal, False)
        if result is None:
            return False
        if isinstance(result, _Damaged):
            return True
        return not _expired(_recorded_access(result), result.ttl, self._clock())

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, expired ones included (reads only; damaged files are skipped)."""
        await self.open()
        infos: list[SessionInfo] = []
        open_sessions = {self._file_base(cid): s for cid, s in self._sessions.items()}
        with _io_errors():
            names = sorted(await aiofiles.os.listdir(str(self._directory)))
        for name in names:
            if not name.endswith(".journal"):
                continue
            session = open_sessions.get(name.removesuffix(".journal"))
            if session is not None:
                if session.file is not None:
                    infos.append(
                        _info(
                            session.client_id,
                            session.created_at,
                            session.last_access,
                            session.ttl,
                            session.state,
                        )
                    )
                continue
            path = os.path.join(self._directory, name)
            with _io_errors():
                result = await _aread_and_parse(path, True)
            if result is None:
                continue
            if isinstance(result, _Damaged):
                logger.warning("skipping damaged session journal %s: %s", path, result.reason)
                continue
            assert result.state is not None
            infos.append(
                _info(
                    result.client_id,
                    result.created_at,
                    _recorded_access(result),
                    result.ttl,
                    result.state,
                )
            )
        return infos

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); durable.

        Creates an empty session when none is stored (an expired one counts as none), so the
        expiry is in force from now on even before the first operation is applied. Takes the
        lease if not held.
        """
        async with self._lock_for(client_id):
            await _run_to_completion(self._update_ttl_locked(client_id, seconds))

    async def _update_ttl_locked(self, client_id: str, seconds: float | None) -> None:
        session = await self._session(client_id)
        now = self._clock()
        if session.file is not None and _expired(session.last_access, session.ttl, now):
            await self._remove_journal(client_id)
            session = await self._session(client_id)
        session.ttl = float(seconds) if seconds else None
        await self._append_metadata(session, now, ttl=True)
        session.last_access = now

    async def cleanup_expired(self) -> int:
        """Remove every expired session nobody holds a lease on; returns how many."""
        await self.open()
        removed = 0
        now = self._clock()
        for info in await self.list_sessions():
            if info.expires_at is None or now < info.expires_at:
                continue
            client_id = info.client_id
            lease = self._leases.get(client_id)
            if lease is not None and lease.explicit:
                continue
            async with self._lock_for(client_id):
                try:
                    if await _run_to_completion(self._remove_if_expired(client_id)):
                        removed += 1
                except SessionLocked:
                    continue
        return removed

    async def _remove_if_expired(self, client_id: str) -> bool:
        held = client_id in self._leases
        if not held:
            await self._take_lease(client_id, explicit=False)
        try:
            # Re-check under the lease: the owner may have touched it since we listed it.
            session = self._sessions.get(client_id)
            if session is not None:
                last_access, ttl = session.last_access, session.ttl
            else:
                result = await _aread_and_parse(self._paths(client_id).journal, False)
                if result is None or isinstance(result, _Damaged):
                    return False
                last_access, ttl = _recorded_access(result), result.ttl
            if not _expired(last_access, ttl, self._clock()):
                return False
            return await self._remove_journal(client_id)
        finally:
            if not held:
                await self._drop_lease(client_id)


def _info(
    client_id: str, created_at: float, last_access: float, ttl: float | None, state: SessionState
) -> SessionInfo:
    inflight = sum(1 for m in state.messages.values() if m.packet_id is not None)
    return SessionInfo(
        client_id=client_id,
        created_at=created_at,
        last_access=last_access,
        expires_at=None if ttl is None else last_access + ttl,
        inflight=inflight,
        queued=len(state.messages) - inflight,
    )
