"""A crash-safe session store: one append-only journal file per session.

Durability model
    :meth:`FileStore.apply` encodes the whole batch into ONE record, appends it with one
    ``write`` and makes it durable with ONE ``fsync`` (group commit), then returns; write and
    fsync run back to back in a single worker-thread hop. A record carries its length and a
    CRC32, so a crash at any byte leaves either the complete record (the batch happened) or a
    torn tail that :meth:`FileStore.load` discards (it did not).
    Creating a journal, compacting it and :meth:`FileStore.save` write a complete new file to a
    temporary name, fsync it, ``os.replace`` it over the journal and fsync the directory: a crash
    leaves the old file or the new one, never a mix. Those three cost two fsyncs (file and
    directory) instead of one; a plain append costs exactly one.

Memory
    While a session is open the store keeps an *index* of it, not its replayed state: the
    small parts (inbound QoS 2 IDs, subscriptions, pending unsubscribes, the highest sequence
    number) in full, and for every stored message only where its ``MessageAdded`` operation
    lies in the journal (offset and length) plus what later operations changed (packet ID,
    released). Queued messages cost about 20 bytes each (three parallel arrays sorted by
    sequence number), never their payload, so an offline client may queue far more than fits in
    memory. Payloads are read back with positioned reads (``os.pread``, in the worker thread)
    when :meth:`FileStore.load` or :meth:`FileStore.read_queued` return messages, and
    compaction streams them from the old file into the new one. The index describes only what
    is durably in the file: an append updates it after the fsync (read-after-write), a rewrite
    replaces it with the new file's; should a compaction fail half way, the store forgets the
    session and reads it from the file again.
    Opening a journal reads it in windows of about a megabyte, or one record if that is
    larger (a rewrite writes records of about :data:`_SNAPSHOT_CHUNK` bytes; an append, one
    batch); only a migration from an older format holds a whole file.

Journal format (version 1, little-endian)::

    header   4s magic b"MQPJ", H format version, H flags (0), d created_at (Unix time),
             I client id length, client id (UTF-8), I CRC32 of the header bytes before it
    record*  B marker 0xA5, I body length, I CRC32 of (length field + body), body
    body     B flags, [d last_access if flags & 1], [d ttl seconds, 0 = never, if flags & 2],
             operations (:mod:`mqtt_persist.stores.serialization`), possibly none

Magic and version sit at fixed offsets in every version, so a newer file is recognised
before anything else is interpreted. Older versions go through :data:`_MIGRATIONS`.

An ``apply`` appends one record. A rewrite (compaction, ``save``) writes the header and then
the session as ``MessageAdded`` operations in ascending sequence order followed by the rest
(inbound IDs, subscriptions, pending unsubscribes), cut into records of about
:data:`_SNAPSHOT_CHUNK` bytes; the first record carries last access and TTL. When messages with
higher sequence numbers than every remaining one were removed, the rewrite ends with
``MessageAdded`` + ``MessageRemoved`` of that highest number (an empty message), so the
replayed ``last_seq`` never goes backwards. All of this is plain version 1.

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
    (while still locked, see ``_files.flock``) when its session has no journal left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from mqtt_persist.session.state import (
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    Operation,
    PacketIdAssigned,
    SessionState,
    StoredMessage,
)
from mqtt_persist.stores._files import file_base, flock, quarantine_target, unlock
from mqtt_persist.stores.base import SessionInfo

# The private names are the MessageAdded layout (part of the on-disk format, documented in
# serialization's docstring), read in place where a journal is opened, compacted or read back:
# checking a header costs a fraction of building operation objects for 100,000s of messages.
from mqtt_persist.stores.serialization import (
    _MSG,
    _MSG_HAS_PACKET_ID,
    _MSG_KNOWN_FLAGS,
    _MSG_QOS_MASK,
    _MSG_RELEASED,
    _MSG_RETAIN,
    _T_MESSAGE_ADDED,
    DecodeError,
    decode_operation_from,
    encode_operation,
    encode_operations,
)

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
# The body prefix of a record without metadata: flags 0.
_PLAIN_BODY = bytes((0,))

#: Target body size of the records a rewrite writes. Opening a journal, compacting it and
#: reading messages back hold about one record at a time, so this bounds their memory (an
#: operation larger than this gets a record of its own).
_SNAPSHOT_CHUNK = 1 << 20
#: Opening a journal reads it in pieces of this size (or one record, if that is larger).
_SCAN_CHUNK = 1 << 20
#: Reading messages back merges the operations wanted into positioned reads of at most this
#: many bytes, bridging gaps of at most ``_READ_GAP`` bytes (other records, removed messages):
#: a queue is written in order, so a page of it is usually one read.
_READ_SPAN = 1 << 20
_READ_GAP = 64 << 10
#: The queued-message arrays are rebuilt without their removed entries once those number more
#: than this and more than half the live ones (see :class:`_Index`).
_INDEX_SLACK = 1024
# Array type codes: "q" is 8 bytes; lengths need 4 (an operation lies inside a record body,
# whose length is a uint32), which "I" is on every platform CPython supports.
_LENGTH_CODE = "I" if array("I").itemsize >= 4 else "L"


#: Upgrades of whole journal files, keyed by the version they upgrade FROM: each returns the
#: file's bytes in the next version. Empty while version 1 is the only version; when version 2
#: arrives, add ``1: _migrate_1_to_2``. A migrated journal is rewritten in the current format
#: the first time it is opened for writing.
_MIGRATIONS: dict[int, Callable[[bytes], bytes]] = {}

#: Positioned read of a journal: ``read(offset, length)``, shorter only where the file ends.
_Read = Callable[[int, int], bytes]

#: A stored message as the index knows it: sequence number, offset and length of its
#: ``MessageAdded`` operation in the journal, packet ID (None while queued), released.
_Entry = tuple[int, int, int, int | None, bool]

#: A message as a rewrite writes it: sequence number, packet ID, released, and its
#: ``MessageAdded`` operation encoded with exactly that packet ID and released flag.
_Placed = tuple[int, int | None, bool, bytes]


# --- the in-memory index of an open session ---------------------------------------------------


class _Index:
    """What a session's journal replays to, minus the bytes of its messages.

    ``meta`` is a :class:`SessionState` that never holds messages: every operation that is not
    about messages is replayed onto it by :meth:`SessionState.apply` itself. For messages the
    index does what :meth:`SessionState.apply` does (the store's property tests compare the
    two), but keeps for each message only where its ``MessageAdded`` operation lies in the
    journal and what later operations changed (packet ID, released).

    In-flight messages (bounded by the packet-ID space, in practice by the in-flight window)
    are a dict of small tuples. Queued messages, which may number 100,000s, are three parallel
    arrays sorted by sequence number: 8 + 8 + 4 bytes per message. Removing one marks its
    offset -1; removed entries before ``q_head`` are skipped for good (a queue drains from the
    front), and the arrays are rebuilt without removed entries once those exceed both
    :data:`_INDEX_SLACK` and half the live ones. So a queued message costs at most 30 bytes
    (plus the arrays' growth reserve and a constant), and every operation stays O(log n)
    amortised, except inserting below the highest queued number (a requeue, or a message added
    out of order), which shifts the arrays behind it.

    Invariants: ``q_seq[q_head:]`` is strictly ascending; entries before ``q_head`` are all
    removed; ``q_dead`` counts every removed entry still in the arrays; a sequence number is
    in ``inflight`` or live in the arrays, never both.
    """

    __slots__ = (
        "inflight",
        "last_seq",
        "meta",
        "q_dead",
        "q_head",
        "q_len",
        "q_live",
        "q_off",
        "q_released",
        "q_seq",
    )

    def __init__(self, client_id: str) -> None:
        self.meta = SessionState(client_id)
        #: Highest sequence number ever added (0: none), by SessionState.last_seq's rule.
        self.last_seq = 0
        #: seq -> (offset, length, packet ID, released) of messages in the in-flight window.
        self.inflight: dict[int, tuple[int, int, int, bool]] = {}
        self.q_seq = array("q")
        self.q_off = array("q")
        self.q_len = array(_LENGTH_CODE)
        self.q_head = 0
        self.q_live = 0
        self.q_dead = 0
        #: Queued messages flagged released (MessageReleased before a packet ID: odd, but a
        #: replay keeps it, so the index does too).
        self.q_released: set[int] = set()

    def live_bytes(self) -> int:
        """Bytes of the operations that still describe a live message (what a rewrite keeps)."""
        q_off, q_len = self.q_off, self.q_len
        queued = sum(q_len[i] for i in range(self.q_head, len(q_off)) if q_off[i] >= 0)
        return queued + sum(entry[1] for entry in self.inflight.values())

    # --- queued entries --------------------------------------------------------------------

    def _find(self, seq: int) -> int:
        """Position of the live queued entry ``seq``, or -1."""
        q_seq = self.q_seq
        if len(q_seq) == self.q_head or seq > q_seq[-1]:
            return -1
        i = bisect_left(q_seq, seq, self.q_head)
        if q_seq[i] == seq and self.q_off[i] >= 0:
            return i
        return -1

    def _add_queued(self, seq: int, offset: int, length: int) -> None:
        """Add a queued entry; ``seq`` must not be live (in flight or queued)."""
        q_seq = self.q_seq
        self.q_live += 1
        if len(q_seq) == self.q_head or seq > q_seq[-1]:
            # The usual case: publish() hands out ascending sequence numbers.
            q_seq.append(seq)
            self.q_off.append(offset)
            self.q_len.append(length)
            return
        i = bisect_left(q_seq, seq, self.q_head)
        if q_seq[i] == seq:
            self.q_dead -= 1  # a removed entry of the same number: reuse it
        elif i == self.q_head and i:
            # Below every queued entry (a requeued message): the removed slot before the head
            # takes it, instead of shifting every entry behind it.
            i -= 1
            self.q_head = i
            q_seq[i] = seq
            self.q_dead -= 1
        else:
            q_seq.insert(i, seq)
            self.q_off.insert(i, offset)
            self.q_len.insert(i, length)
            return
        self.q_off[i] = offset
        self.q_len[i] = length

    def _remove_queued(self, i: int) -> None:
        q_off = self.q_off
        q_off[i] = -1
        self.q_released.discard(self.q_seq[i])
        self.q_live -= 1
        self.q_dead += 1
        if i == self.q_head:
            head = i + 1
            end = len(q_off)
            while head < end and q_off[head] < 0:
                head += 1
            self.q_head = head
        if not self.q_live or (self.q_dead > _INDEX_SLACK and self.q_dead > self.q_live >> 1):
            self._drop_removed()

    def _drop_removed(self) -> None:
        """Rebuild the arrays without removed entries: O(n), amortised by how rarely it runs."""
        head = self.q_head
        if not self.q_live:
            keep: slice | list[int] = slice(0, 0)
        elif self.q_dead == head:
            keep = slice(head, None)  # nothing removed behind the head: cut the front off
        else:
            q_off = self.q_off
            keep = [i for i in range(head, len(q_off)) if q_off[i] >= 0]
        if isinstance(keep, slice):
            self.q_seq = self.q_seq[keep]
            self.q_off = self.q_off[keep]
            self.q_len = self.q_len[keep]
        else:
            q_seq, q_off, q_len = self.q_seq, self.q_off, self.q_len
            self.q_seq = array("q", [q_seq[i] for i in keep])
            self.q_off = array("q", [q_off[i] for i in keep])
            self.q_len = array(_LENGTH_CODE, [q_len[i] for i in keep])
        self.q_head = 0
        self.q_dead = 0

    # --- replay ----------------------------------------------------------------------------

    def add(
        self, seq: int, offset: int, length: int, packet_id: int | None, released: bool
    ) -> None:
        """A ``MessageAdded`` of this message, encoded at ``offset`` (``length`` bytes)."""
        if seq > self.last_seq:
            self.last_seq = seq
        if seq in self.inflight:
            return  # a replayed MessageAdded changes nothing (SessionState.apply)
        q_seq = self.q_seq
        if packet_id is None and (len(q_seq) == self.q_head or seq > q_seq[-1]):
            # The usual case, inlined: a new message above every queued one.
            q_seq.append(seq)
            self.q_off.append(offset)
            self.q_len.append(length)
            self.q_live += 1
            if released:
                self.q_released.add(seq)
            return
        if self._find(seq) >= 0:
            return
        if packet_id is None:
            self._add_queued(seq, offset, length)
            if released:
                self.q_released.add(seq)
        else:
            self.inflight[seq] = (offset, length, packet_id, released)

    def apply(self, op: Operation, offset: int, length: int) -> None:
        """Replay one operation, whose encoding lies at ``offset`` (``length`` bytes)."""
        if type(op) is MessageAdded:
            m = op.message
            self.add(m.seq, offset, length, m.packet_id, m.released)
        elif type(op) is PacketIdAssigned:
            seq = op.seq
            if (entry := self.inflight.get(seq)) is not None:
                self.inflight[seq] = (entry[0], entry[1], op.packet_id, entry[3])
            elif (i := self._find(seq)) >= 0:
                released = seq in self.q_released
                self.inflight[seq] = (self.q_off[i], self.q_len[i], op.packet_id, released)
                self._remove_queued(i)
        elif type(op) is MessageReleased:
            if (entry := self.inflight.get(op.seq)) is not None:
                self.inflight[op.seq] = (entry[0], entry[1], entry[2], True)
            elif self._find(op.seq) >= 0:
                self.q_released.add(op.seq)
        elif type(op) is MessageRequeued:
            if (entry := self.inflight.pop(op.seq, None)) is not None:
                self._add_queued(op.seq, entry[0], entry[1])  # no packet ID, not released
            else:
                self.q_released.discard(op.seq)
        elif type(op) is MessageRemoved:
            if self.inflight.pop(op.seq, None) is None and (i := self._find(op.seq)) >= 0:
                self._remove_queued(i)
        else:
            self.meta.apply(op)

    def apply_batch(self, ops: Sequence[Operation], encoded: Sequence[bytes], offset: int) -> None:
        """Replay a batch whose encoded operations lie back to back from ``offset``."""
        for op, data in zip(ops, encoded, strict=True):
            self.apply(op, offset, len(data))
            offset += len(data)

    # --- queries ---------------------------------------------------------------------------

    def queued_after(self, after_seq: int | None, limit: int | None) -> list[_Entry]:
        """Queued entries with ``seq > after_seq`` (None: all), ascending, at most ``limit``."""
        q_seq, q_off, q_len, released = self.q_seq, self.q_off, self.q_len, self.q_released
        i = self.q_head if after_seq is None else bisect_right(q_seq, after_seq, self.q_head)
        want = self.q_live if limit is None else limit
        end = len(q_seq)
        entries: list[_Entry] = []
        while i < end and len(entries) < want:
            offset = q_off[i]
            if offset >= 0:
                seq = q_seq[i]
                entries.append((seq, offset, q_len[i], None, seq in released))
            i += 1
        return entries

    def inflight_entries(self) -> list[_Entry]:
        """In-flight entries, ascending."""
        return sorted(
            (seq, offset, length, packet_id, released)
            for seq, (offset, length, packet_id, released) in self.inflight.items()
        )

    def entries(self) -> Iterator[_Entry]:
        """Every message's entry, ascending, without materialising the queue."""
        inflight = self.inflight_entries()
        k = 0
        q_seq, q_off, q_len, released = self.q_seq, self.q_off, self.q_len, self.q_released
        for i in range(self.q_head, len(q_seq)):
            offset = q_off[i]
            if offset < 0:
                continue
            seq = q_seq[i]
            while k < len(inflight) and inflight[k][0] < seq:
                yield inflight[k]
                k += 1
            yield (seq, offset, q_len[i], None, seq in released)
        yield from inflight[k:]

    def to_state(self, messages: list[StoredMessage], queued_loaded: int) -> SessionState:
        """The session with these messages (read back for ``load``), as a new SessionState."""
        meta = self.meta
        return SessionState(
            meta.client_id,
            {m.seq: m for m in messages},
            set(meta.inbound_qos2),
            dict(meta.subscriptions),
            set(meta.pending_unsubscribes),
            last_seq=self.last_seq,
            queued_not_loaded=self.q_live - queued_loaded,
        )


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
    index: _Index | None
    last_access: float | None
    ttl: float | None
    #: Offset just past the last valid record: where the file should end.
    good_end: int
    #: Size of what was parsed (the file, or the migrated bytes).
    size: int
    #: Bytes after ``good_end`` are a torn final record.
    torn: bool
    #: The file was in an older format: the migrated bytes, which ``index`` describes.
    migrated: bytes | None


def _encode_header(client_id: str, created_at: float) -> bytes:
    client_id_bytes = client_id.encode("utf-8", "surrogatepass")
    head = (
        _HEADER.pack(MAGIC, FORMAT_VERSION, 0, created_at, len(client_id_bytes)) + client_id_bytes
    )
    return head + _U32.pack(zlib.crc32(head))


def _record_header(body: bytes | bytearray) -> bytes:
    if len(body) > _MAX_BODY:
        raise StoreError(f"a batch of {len(body)} bytes does not fit in one journal record")
    length = _U32.pack(len(body))
    return _RECORD.pack(_RECORD_MARK, len(body), zlib.crc32(body, zlib.crc32(length)))


def _encode_record(body: bytes) -> bytes:
    return _record_header(body) + body


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


def _pread(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``: fewer only where the file ends."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _reader(fd: int | None, size: int, extra: bytes = b"") -> _Read:
    """Positioned reads of the first ``size`` bytes of ``fd``, continued by ``extra``.

    ``extra`` is a record not written anywhere yet: a compaction triggered by ``apply`` reads
    the journal as it would be with the batch appended. ``fd`` None: ``extra`` is everything.
    """

    def read(offset: int, length: int) -> bytes:
        if offset >= size:
            start = offset - size
            return extra[start : start + length]
        assert fd is not None
        if offset + length <= size:
            return _pread(fd, length, offset)
        return _pread(fd, size - offset, offset) + extra[: offset + length - size]

    return read


def _parse_journal(read: _Read, size: int, *, decode: bool = True) -> _Parsed:
    """Replay a journal of ``size`` bytes through ``read``, in a window moving record by record.

    Raises :class:`_Damaged` for anything but a torn tail. With ``decode`` the result's index
    describes the session; without it only the metadata and the extent are checked.
    """
    preamble = read(0, _PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        raise _Damaged("file too short for a journal header")
    magic, version = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise _Damaged(f"bad magic {magic!r}: not a session journal")
    if version > FORMAT_VERSION:
        raise _Damaged(
            f"journal format version {version} is newer than this library's {FORMAT_VERSION}",
            newer_version=True,
        )
    migrated: bytes | None = None
    if version < FORMAT_VERSION:
        # Migrations transform whole files: the one time a journal is held in memory at once.
        migrated = _migrate(read(0, size), version)
        read, size = _reader(None, 0, migrated), len(migrated)
    head = read(0, _HEADER.size)
    if len(head) < _HEADER.size:
        raise _Damaged("file too short for a journal header")
    magic, version, flags, created_at, id_length = _HEADER.unpack(head)
    if flags:
        raise _Damaged(f"unknown header flags 0x{flags:04x}")
    id_end = _HEADER.size + id_length
    if id_end + _U32.size > size:
        raise _Damaged("journal header truncated")
    head = read(0, id_end + _U32.size)
    if len(head) < id_end + _U32.size:
        raise _Damaged("journal header truncated")
    if zlib.crc32(head[:id_end]) != _U32.unpack_from(head, id_end)[0]:
        raise _Damaged("journal header checksum mismatch")
    try:
        client_id = head[_HEADER.size : id_end].decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise _Damaged("client id in the header is not UTF-8") from exc

    index = _Index(client_id) if decode else None
    last_access: float | None = None
    ttl: float | None = None
    offset = id_end + _U32.size
    # ``buf`` holds the file's bytes from ``buf_start``: a window that moves record by record.
    buf = b""
    buf_start = offset
    while offset < size:
        valid = False
        if offset + _RECORD.size <= size:
            if offset + _RECORD.size > buf_start + len(buf):
                wanted = min(max(_SCAN_CHUNK, _RECORD.size), size - offset)
                buf = b""  # let the old window go before the new one is read
                buf, buf_start = read(offset, wanted), offset
            if offset + _RECORD.size <= buf_start + len(buf):
                mark, length, crc = _RECORD.unpack_from(buf, offset - buf_start)
                end = offset + _RECORD.size + length
                if mark == _RECORD_MARK and length and end <= size:
                    if end > buf_start + len(buf):
                        wanted = max(end - offset, min(_SCAN_CHUNK, size - offset))
                        buf = b""
                        buf, buf_start = read(offset, wanted), offset
                    p = offset - buf_start
                    if end <= buf_start + len(buf):
                        length_crc = zlib.crc32(buf[p + 1 : p + 5])
                        with memoryview(buf) as view:  # no copy of the body
                            body = view[p + _RECORD.size : end - buf_start]
                            valid = zlib.crc32(body, length_crc) == crc
                            body.release()
        if not valid:
            # Damage; a torn tail only if no valid record follows (what a crash leaves).
            if (later := _valid_record_after(read(offset, size - offset), 0)) is not None:
                raise _Damaged(
                    f"damaged record at offset {offset} followed by a valid one at {offset + later}"
                )
            return _Parsed(
                client_id, created_at, index, last_access, ttl, offset, size, True, migrated
            )
        # The body is buf[position:stop]; nothing is copied out of the window.
        position = offset - buf_start + _RECORD.size
        stop = end - buf_start
        body_flags = buf[position]
        if body_flags & ~_BODY_KNOWN:
            raise _Damaged(f"record at offset {offset} has unknown flags 0x{body_flags:02x}")
        position += 1
        metadata_end = position + _F64.size * (
            bool(body_flags & _BODY_ACCESS) + bool(body_flags & _BODY_TTL)
        )
        if metadata_end > stop:
            raise _Damaged(f"record at offset {offset} is too short for its metadata")
        if body_flags & _BODY_ACCESS:
            last_access = _F64.unpack_from(buf, position)[0]
            position += _F64.size
        if body_flags & _BODY_TTL:
            ttl = _F64.unpack_from(buf, position)[0] or None
        if index is not None and metadata_end < stop:
            try:
                _replay_ops(index, buf, metadata_end, stop, buf_start)
            except DecodeError as exc:
                raise _Damaged(f"record at offset {offset}: {exc}") from exc
        offset = end
    return _Parsed(client_id, created_at, index, last_access, ttl, size, size, False, migrated)


def _replay_ops(index: _Index, buf: bytes, at: int, end: int, base: int) -> None:
    """Replay the operations in ``buf[at:end]`` onto ``index``; ``buf`` is the file from ``base``.

    A ``MessageAdded`` is checked as thoroughly as decoding it would (flags, lengths, the topic
    is UTF-8) but never built: its payload stays in the file. Raises :class:`DecodeError`
    (offsets in its message count from the record's first operation).
    """
    add = index.add
    unpack = _MSG.unpack_from
    header_size = _MSG.size
    first = at
    while at < end:
        if buf[at] != _T_MESSAGE_ADDED:
            op, next_at = decode_operation_from(buf, at)
            if next_at > end:
                raise DecodeError(f"operation at offset {at - first} is truncated")
            index.apply(op, base + at, next_at - at)
            at = next_at
            continue
        if at + header_size > end:
            raise DecodeError(f"operation at offset {at - first} is truncated")
        _, seq, flags, packet_id, topic_length, payload_length = unpack(buf, at)
        topic_at = at + header_size
        next_at = topic_at + topic_length + payload_length
        if flags & ~_MSG_KNOWN_FLAGS or flags & _MSG_QOS_MASK == 3:
            raise DecodeError(f"invalid message flags 0x{flags:02x} at offset {at - first}")
        if packet_id and not flags & _MSG_HAS_PACKET_ID:
            raise DecodeError(f"packet id without its flag at offset {at - first}")
        if next_at > end:
            raise DecodeError(f"message at offset {at - first} runs past the end of its record")
        try:
            buf[topic_at : topic_at + topic_length].decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"topic at offset {topic_at - first} is not valid UTF-8") from exc
        add(
            seq,
            base + at,
            next_at - at,
            packet_id if flags & _MSG_HAS_PACKET_ID else None,
            bool(flags & _MSG_RELEASED),
        )
        at = next_at


def _parse_fd(fd: int, decode: bool) -> _Parsed:
    size = os.fstat(fd).st_size
    return _parse_journal(_reader(fd, size), size, decode=decode)


# --- messages read back from a journal (run in a worker thread) -------------------------------


def _groups(read: _Read, entries: Iterable[_Entry]) -> Iterator[tuple[list[_Entry], bytes, int]]:
    """Entries in groups that one positioned read serves: (group, buffer, its file offset).

    Entries close together in the journal share a read of up to :data:`_READ_SPAN` bytes, so
    paging through a queue (written in order) costs a few large reads, not one per message.
    """
    group: list[_Entry] = []
    start = end = 0
    for entry in entries:
        offset = entry[1]
        entry_end = offset + entry[2]
        if group and start <= offset <= end + _READ_GAP and entry_end - start <= _READ_SPAN:
            group.append(entry)
            if entry_end > end:
                end = entry_end
            continue
        if group:
            yield group, _read_exactly(read, start, end), start
        group = [entry]
        start, end = offset, entry_end
    if group:
        yield group, _read_exactly(read, start, end), start


def _read_exactly(read: _Read, start: int, end: int) -> bytes:
    buf = read(start, end - start)
    if len(buf) < end - start:
        raise StoreError(
            f"the journal ends before offset {end}, where its index expects a message: "
            "was it changed behind the store's back?"
        )
    return buf


def _not_there(entry: _Entry) -> StoreError:
    return StoreError(
        f"the journal holds no message {entry[0]} at offset {entry[1]}, where its index expects "
        "it: was it changed behind the store's back?"
    )


def _read_messages(fd: int, size: int, entries: list[_Entry]) -> list[StoredMessage]:
    """The messages of ``entries``, in their order, read back from the journal ``fd``."""
    messages: list[StoredMessage] = []
    for group, buf, start in _groups(_reader(fd, size), entries):
        messages += _messages_in(group, buf, start)
    return messages


def _messages_in(group: list[_Entry], buf: bytes, start: int) -> list[StoredMessage]:
    """The messages of ``group``, built from ``buf`` (the journal from offset ``start``).

    Each is built straight from its ``MessageAdded`` bytes after checking that they are the
    operation the index expects (type, sequence number, length); packet ID and released come
    from the index, as later operations may have changed them.
    """
    unpack = _MSG.unpack_from
    header_size = _MSG.size
    messages: list[StoredMessage] = []
    append = messages.append
    for entry in group:
        seq, offset, length, packet_id, released = entry
        at = offset - start
        if length < header_size:
            raise _not_there(entry)
        kind, stored_seq, flags, _, topic_length, payload_length = unpack(buf, at)
        if (
            kind != _T_MESSAGE_ADDED
            or stored_seq != seq
            or header_size + topic_length + payload_length != length
        ):
            raise _not_there(entry)
        topic_at = at + header_size
        payload_at = topic_at + topic_length
        try:
            topic = buf[topic_at:payload_at].decode()
        except UnicodeDecodeError as exc:  # checked when the journal was opened
            raise _not_there(entry) from exc
        append(
            StoredMessage(
                seq,
                topic,
                buf[payload_at : at + length],
                flags & _MSG_QOS_MASK,
                bool(flags & _MSG_RETAIN),
                packet_id,
                released,
            )
        )
    return messages


def _index_source(read: _Read, size: int, index: _Index) -> Iterator[_Placed]:
    """An index's messages for a rewrite, streamed from the ``size`` bytes ``read`` gives.

    The journal is read in windows of :data:`_READ_SPAN` bytes from the next message wanted,
    so it passes through once, front to back. A message whose stored operation still says what
    the index says (the usual queued one: no packet ID, not released) is copied byte for byte
    after the same check as :func:`_messages_in`; the others are re-encoded.
    """
    unpack = _MSG.unpack_from
    header_size = _MSG.size
    buf = b""
    start = 0
    window_end = 0
    for entry in index.entries():
        seq, offset, length, packet_id, released = entry
        if offset < start or offset + length > window_end:
            buf = b""  # let the old window go before the new one is read
            window = max(length, min(_READ_SPAN, size - offset))
            buf = _read_exactly(read, offset, offset + window)
            start, window_end = offset, offset + window
        at = offset - start
        if length < header_size:
            raise _not_there(entry)
        kind, stored_seq, flags, stored_packet_id, topic_length, payload_length = unpack(buf, at)
        if (
            kind != _T_MESSAGE_ADDED
            or stored_seq != seq
            or header_size + topic_length + payload_length != length
        ):
            raise _not_there(entry)
        stored = stored_packet_id if flags & _MSG_HAS_PACKET_ID else None
        if stored == packet_id and bool(flags & _MSG_RELEASED) == released:
            op = buf[at : at + length]
        else:
            [message] = _messages_in([entry], buf, start)
            op = encode_operation(MessageAdded(message))
        yield seq, packet_id, released, op


def _state_source(state: SessionState) -> Iterator[_Placed]:
    """A snapshot's messages for a rewrite (``save``), in ascending sequence order."""
    for m in sorted(state.messages.values(), key=lambda m: m.seq):
        yield m.seq, m.packet_id, m.released, encode_operation(MessageAdded(m))


def _write_snapshot(
    fd: int,
    client_id: str,
    created_at: float,
    now: float,
    ttl: float | None,
    messages: Iterator[_Placed],
    meta: SessionState,
    last_seq: int,
    sync: bool,
) -> tuple[_Index, int]:
    """Write a whole journal to ``fd`` (a new, empty file) and fsync it: one worker-thread hop.

    ``messages`` (ascending) and ``meta`` (the rest of the session) are cut into records of
    about :data:`_SNAPSHOT_CHUNK` bytes; the first record carries last access and TTL. The
    index of the new file is built as the operations are placed. Returns it and the size.
    """
    index = _Index(client_id)
    index.meta = meta.copy()
    header = _encode_header(client_id, created_at)
    _write_and_sync(fd, header, False)
    position = len(header)  # where the record being filled will start
    body = bytearray(_encode_body(b"", last_access=now, ttl=ttl if ttl is not None else 0.0))
    empty = used = len(body)

    def flush() -> None:
        nonlocal position, body, empty, used
        _write_and_sync(fd, _record_header(body), False)
        _write_and_sync(fd, body, False)
        position += _RECORD.size + len(body)
        body = bytearray(_PLAIN_BODY)
        empty = used = len(body)

    add = index.add
    # Queued messages arrive in ascending order: append them to the index directly.
    append_seq, append_off, append_len = index.q_seq.append, index.q_off.append, index.q_len.append
    queued = 0
    highest: int | None = None
    for seq, packet_id, released, op in messages:
        length = len(op)
        if used > empty and used + length > _SNAPSHOT_CHUNK:
            flush()
        offset = position + _RECORD.size + used
        if packet_id is None and not released and (highest is None or seq > highest):
            append_seq(seq)
            append_off(offset)
            append_len(length)
            queued += 1
        else:
            add(seq, offset, length, packet_id, released)
        body += op
        used += length
        if highest is None or seq > highest:
            highest = seq
    index.q_live += queued
    tail = meta.to_operations()
    if last_seq > 0 and (highest is None or last_seq > highest):
        # Messages above every remaining one were removed: keep their highest number in the
        # replay (SessionState.last_seq), so sequence numbers never go backwards.
        tail += [MessageAdded(StoredMessage(last_seq, "", b"", 1)), MessageRemoved(last_seq)]
    body += encode_operations(tail)
    flush()
    index.last_seq = max(index.last_seq, last_seq, highest or 0)
    if sync:
        _fsync_fd(fd)
    return index, position


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


def _write_and_sync(fd: int, data: bytes | bytearray, sync: bool) -> None:
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


def _read_and_parse(path: str, decode: bool) -> _Parsed | _Damaged | None:
    """Lock-free read-only parse for listing: None if the file vanished."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _parse_fd(fd, decode)
    except _Damaged as damaged:
        return damaged
    finally:
        os.close(fd)


_afsync = aiofiles.os.wrap(_fsync_fd)
_awrite_and_sync = aiofiles.os.wrap(_write_and_sync)
_afsync_directory = aiofiles.os.wrap(_fsync_directory)
_alock = aiofiles.os.wrap(flock)
_aunlock = aiofiles.os.wrap(unlock)
_aquarantine_target = aiofiles.os.wrap(quarantine_target)
_aparse_fd = aiofiles.os.wrap(_parse_fd)
_aread_and_parse = aiofiles.os.wrap(_read_and_parse)
_aread_messages = aiofiles.os.wrap(_read_messages)
_awrite_snapshot = aiofiles.os.wrap(_write_snapshot)


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
    #: What the journal replays to, with the messages' bytes left in the file.
    index: _Index
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

    def _paths(self, client_id: str) -> _Paths:
        base = os.path.join(self._directory, file_base(client_id))
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
        target = await _aquarantine_target(path)
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
            return _Session(client_id, paths, None, 0, 0, _Index(client_id), now, now, now, None)
        except OSError as exc:
            raise StoreError(f"cannot open {paths.journal}: {exc}") from exc
        try:
            try:
                parsed = await _aparse_fd(f.fileno(), True)
                if parsed.client_id != client_id:
                    raise _Damaged(f"journal belongs to client id {parsed.client_id!r}")
            except _Damaged as damaged:
                await f.close()
                raise await self._quarantine(
                    paths.journal, damaged.reason, newer_version=damaged.newer_version
                ) from None
            assert parsed.index is not None
            if parsed.torn:
                logger.warning(
                    "%s: discarding %d bytes of a torn final record (a write interrupted by a "
                    "crash); the batch it held was never acknowledged",
                    paths.journal,
                    parsed.size - parsed.good_end,
                )
                # A migrated journal is replaced as a whole below; cutting the old file at an
                # offset of the migrated bytes would damage it.
                if parsed.migrated is None:
                    await f.truncate(parsed.good_end)
                    if self._fsync:
                        await _afsync(f.fileno())
            # The parse used positioned reads; appends go where the last good record ends.
            await f.seek(parsed.good_end)
        except BaseException:
            if not f.closed:
                await f.close()
            raise
        last_access = _recorded_access(parsed)
        index = parsed.index
        # A journal that is mostly live data counts as freshly rewritten, so reopening does
        # not rewrite it on the first append; one that is mostly dead weight (more than twice
        # its live bytes) gets the baseline 0 and is compacted by that first append.
        mostly_live = parsed.good_end <= 2 * index.live_bytes()
        session = _Session(
            client_id,
            paths,
            f,
            parsed.good_end,
            parsed.good_end if mostly_live else 0,
            index,
            parsed.created_at,
            last_access,
            last_access,
            parsed.ttl,
        )
        if parsed.migrated is not None:
            # The index describes the migrated bytes, not the file: rewrite from those.
            migrated = parsed.migrated
            source = _index_source(_reader(None, 0, migrated), len(migrated), index)
            try:
                await self._rewrite(session, source, index.meta, index.last_seq, self._clock())
            except BaseException:
                if session.file is f and not f.closed:
                    await f.close()
                raise
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

    async def _forget(self, session: _Session) -> None:
        """Drop the open session (the lease stays): the next operation reads the journal."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        if session.file is not None:
            with contextlib.suppress(OSError):
                await session.file.close()

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
            await self._forget(session)

    async def _rewrite(
        self,
        session: _Session,
        messages: Iterator[_Placed],
        meta: SessionState,
        last_seq: int,
        now: float,
    ) -> None:
        """Atomically replace the journal with a snapshot (create/compact/save/migrate).

        ``messages`` (ascending) are streamed into the new file in one worker-thread hop:
        compaction reads them from the old journal as it goes, so the session is never held in
        memory whole. ``meta`` and ``last_seq`` give the rest of the session.
        """
        paths = session.paths
        try:
            f = await aiofiles.open(paths.tmp, "w+b", buffering=0, opener=_private_opener)
        except OSError as exc:
            raise StoreError(f"cannot create {paths.tmp}: {exc}") from exc
        try:
            index, size = await _awrite_snapshot(
                f.fileno(),
                session.client_id,
                session.created_at,
                now,
                session.ttl,
                messages,
                meta,
                last_seq,
                self._fsync,
            )
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
        session.size = session.snapshot_size = size
        session.index = index
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
            index = session.index  # no journal yet: the session is empty but for metadata
            await self._rewrite(session, iter(()), index.meta, index.last_seq, now)
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

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """Read the session (repairing a torn tail), or None; takes the lease if not held.

        With ``queued_limit``, only the in-flight messages and the first ``queued_limit``
        queued ones are read back from the journal (see
        :meth:`~mqtt_persist.stores.base.SessionStore.load`); the rest stay on disk.

        Raises :class:`~mqtt_persist.errors.SessionExpired` (the session is removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (the journal is quarantined) or
        :class:`~mqtt_persist.errors.SessionLocked` (another process holds the session).
        """
        async with self._lock_for(client_id):
            return await _run_to_completion(self._load_locked(client_id, queued_limit))

    async def _load_locked(self, client_id: str, queued_limit: int | None) -> SessionState | None:
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
        index = session.index
        queued = index.queued_after(None, queued_limit)
        entries = sorted(queued + index.inflight_entries()) if index.inflight else queued
        return index.to_state(await self._read(session, entries), len(queued))

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages with ``seq > after_seq``, ascending, at most ``limit``.

        Read back from the journal with a few positioned reads (consecutive messages share
        one); the index finds them by bisection. Like :meth:`load` this takes the lease if not
        held and counts as an access; like :meth:`apply` it does not check expiry: the caller
        holds the session.
        """
        async with self._lock_for(client_id):
            return await _run_to_completion(self._read_queued_locked(client_id, after_seq, limit))

    async def _read_queued_locked(
        self, client_id: str, after_seq: int, limit: int
    ) -> list[StoredMessage]:
        if client_id not in self._sessions:
            await self.open()
            if not await aiofiles.os.path.exists(self._paths(client_id).journal):
                return []
        session = await self._session(client_id)
        if session.file is None:
            return []
        session.last_access = self._clock()
        return await self._read(session, session.index.queued_after(after_seq, limit))

    async def _read(self, session: _Session, entries: list[_Entry]) -> list[StoredMessage]:
        """The messages of ``entries``, read back from the session's journal."""
        if not entries:
            return []
        assert session.file is not None
        return await _aread_messages(session.file.fileno(), session.size, entries)

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot (atomic file replace).

        The journal then holds exactly ``state``'s messages: queued messages that a ``load``
        with ``queued_limit`` left out of ``state`` are not kept.
        """
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
        meta = SessionState(
            client_id,
            inbound_qos2=snapshot.inbound_qos2,
            subscriptions=snapshot.subscriptions,
            pending_unsubscribes=snapshot.pending_unsubscribes,
        )
        await self._rewrite(
            session, _state_source(snapshot), meta, snapshot.last_seq, self._clock()
        )

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Append ``ops`` as one record with one write and one fsync; durable on return.

        The first batch of a new session, and a batch that triggers compaction, replace the
        file instead (two fsyncs). An empty batch only counts as an access. Expiry is not
        checked: the caller holds the session.
        """
        # One encoding per operation: the index records where each lands in the journal.
        encoded = [encode_operation(op) for op in ops]
        async with self._lock_for(client_id):
            await _run_to_completion(self._apply_locked(client_id, ops, encoded))

    async def _apply_locked(
        self, client_id: str, ops: Sequence[Operation], encoded: list[bytes]
    ) -> None:
        if not ops:
            if (session := self._sessions.get(client_id)) is not None:
                session.last_access = self._clock()
            return
        session = await self._session(client_id)
        now = self._clock()
        record_access = now - session.persisted_access >= self._access_write_interval
        ops_bytes = b"".join(encoded)
        body = _encode_body(ops_bytes, last_access=now if record_access else None)
        record = _encode_record(body)
        # Where the batch's first operation lies once the record is appended.
        ops_offset = session.size + _RECORD.size + len(body) - len(ops_bytes)
        limit = max(self._compact_threshold, 4 * session.snapshot_size)
        if session.file is None or session.size + len(record) > limit:
            # Compact instead of appending: replay the batch onto the index as if the record
            # followed the journal, and stream the result from both into a new file.
            index = session.index
            index.apply_batch(ops, encoded, ops_offset)
            fd = session.file.fileno() if session.file is not None else None
            read = _reader(fd, session.size, record)
            try:
                source = _index_source(read, session.size + len(record), index)
                await self._rewrite(session, source, index.meta, index.last_seq, now)
            except BaseException:
                if session.index is index:
                    # The index holds a batch the journal does not (a copy would have cost
                    # another index): forget the session, so it is read from the file again.
                    await self._forget(session)
                raise
            return
        await self._append(session, record)
        session.size += len(record)
        # Only now: the index must never describe a record that is not durably in the file.
        session.index.apply_batch(ops, encoded, ops_offset)
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
        open_sessions = {file_base(cid): s for cid, s in self._sessions.items()}
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
                            session.index,
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
            assert result.index is not None
            infos.append(
                _info(
                    result.client_id,
                    result.created_at,
                    _recorded_access(result),
                    result.ttl,
                    result.index,
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
    client_id: str, created_at: float, last_access: float, ttl: float | None, index: _Index
) -> SessionInfo:
    return SessionInfo(
        client_id=client_id,
        created_at=created_at,
        last_access=last_access,
        expires_at=None if ttl is None else last_access + ttl,
        inflight=len(index.inflight),
        queued=index.q_live,
    )
