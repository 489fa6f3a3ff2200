"""FileStore's journal file: its format, and how one is read (checked and replayed).

Journal format (version 2, little-endian)::

    header   4s magic b"MQPJ", H format version, H flags (0), d created_at (Unix time),
             I client id length, client id (UTF-8), I CRC32 of the header bytes before it
    record*  B marker 0xA5, I body length, I CRC32 of (length field + body), body
    body     B flags, [d last_access if flags & 1], [d ttl seconds, 0 = never, if flags & 2],
             operations (:mod:`mqtt_persist.stores.serialization`), possibly none

Magic and version sit at fixed offsets in every version, so a newer file is recognised
before anything else is interpreted. Older versions go through :data:`MIGRATIONS`.

Version 2 differs from version 1 only in the operations a body may hold (the types and optional
fields marked v2 in :mod:`~mqtt_persist.stores.serialization`: message properties and expiry,
subscription options and identifier, ``ProtocolVersionSet``, ``MessageSetAside``,
``SetAsideRemoved``); every version-1 operation reads the same. The migration from version 1
rewrites the header's version (and its CRC) and puts one record right after the header,
``ProtocolVersionSet(4)`` (version 1 spoke MQTT 3.1.1 only): before every other record, so a
torn tail stays a tail. The store then rewrites the migrated journal as a snapshot.

An ``apply`` appends one record. A rewrite (compaction, ``save``) writes the header and then
the session: each set-aside message as ``MessageAdded`` + ``MessageSetAside``, the messages as
``MessageAdded`` operations in ascending sequence order, then the rest (inbound IDs,
subscriptions, pending unsubscribes, the protocol level), cut into records of about
``sizes.SNAPSHOT_CHUNK`` bytes; the first record carries last access and TTL. When messages
with higher sequence numbers than every remaining one were removed, the rewrite ends with
``MessageAdded`` + ``MessageRemoved`` of that highest number (an empty message), so the
replayed ``last_seq`` never goes backwards. A rewrite is made of ordinary operations only.

Metadata lives in the journal itself: ``created_at`` in the header (never rewritten; compaction
copies it), ``last_access`` and the TTL in record bodies, so metadata is exactly as atomic and
as checked as the operations, with no second file to keep consistent. ``expires_at`` is derived
as ``last_access + ttl``. ``last_access`` is updated in memory by every :meth:`~FileStore.load`
and :meth:`~FileStore.apply`; it reaches the disk piggybacked on the next ``apply`` record once
the persisted value is ``access_write_interval`` seconds old (8 extra bytes, no extra I/O), and
on :meth:`~FileStore.release`/:meth:`~FileStore.close`. A crash can therefore lose up to
``access_write_interval`` seconds of last access, which can only make a session expire that
much earlier than it would have.

Preallocated tail
    With fsync on, the store extends a journal with zeros ahead of its records
    (``sizes.PREALLOC_CHUNK`` at a time) and writes the records over them, so the file may end
    in zeros: the records end where the first all-zero byte run reaches the end of the file.
    Such a tail is free space, not damage (:attr:`Parsed.zero_tail`); nothing marks the logical
    end but the records themselves, which is enough because a record never starts with a zero
    byte (its marker is ``0xA5``) and every record is checksummed.

Damage
    A damaged final record (short, or failing its CRC, possibly followed by zeros) is what a
    crash mid-append leaves: it is dropped and the file truncated to the last good record
    (logged as a warning). Writes into the preallocated zeros reach the disk page by page in
    any order until a sync, so a crash can also leave a damaged record followed by valid ones
    that were never synced (and so never acknowledged): that is recognised by a lost piece of
    a sector in the damaged bytes (at least ``_LOST_MIN`` zero bytes starting or ending on a
    512-byte boundary, the stale zeros of a page that never reached the disk) and cut like a
    torn tail, valid records after it included. Any other damage with valid records after it,
    a bad header, a bad magic or a newer version cannot come from a crash: the file is renamed
    to ``<name>.corrupt-<UTC timestamp>`` (never deleted) and
    :class:`~mqtt_persist.errors.SessionCorrupt` (or
    :class:`~mqtt_persist.errors.UnsupportedFormatVersion`) names both paths.

Everything here blocks or is pure: it runs on the store's worker thread.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from mqtt_persist.errors import StoreError
from mqtt_persist.session.state import ProtocolVersionSet
from mqtt_persist.stores.file import sizes
from mqtt_persist.stores.file.index import Index

# The private names are the MessageAdded layout (part of the on-disk format, documented in
# serialization's docstring), read in place where a journal is opened: checking a header costs
# a fraction of building operation objects for 100,000s of messages.
from mqtt_persist.stores.serialization import (
    _MSG,
    _MSG_EXTRAS,
    _MSG_HAS_PACKET_ID,
    _MSG_KNOWN_FLAGS,
    _MSG_QOS_MASK,
    _MSG_RELEASED,
    _T_MESSAGE_ADDED,
    DecodeError,
    decode_operation_from,
    encode_operation,
    message_layout,
)

#: First bytes of every journal file.
MAGIC = b"MQPJ"
#: The journal format this module writes.
FORMAT_VERSION = 2

# The preamble (magic, version) is the same in every version; the rest may change with it.
_PREAMBLE = struct.Struct("<4sH")
HEADER = struct.Struct("<4sHHdI")  # magic, version, flags, created_at, client id length
U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
RECORD = struct.Struct("<BII")  # marker, body length, CRC32 of (length field + body)
_RECORD_MARK = 0xA5
_RECORD_MARK_BYTE = bytes((_RECORD_MARK,))
# Bodies never exceed this: the length field is a uint32.
_MAX_BODY = 0xFFFFFFFF

_BODY_ACCESS = 0x01
_BODY_TTL = 0x02
_BODY_KNOWN = _BODY_ACCESS | _BODY_TTL
# The body prefix of a record without metadata: flags 0.
PLAIN_BODY = bytes((0,))

#: Upgrades of whole journal files, keyed by the version they upgrade FROM: each returns the
#: file's bytes in a later version (or raises :class:`Damaged`). A migrated journal is
#: rewritten in the current format the first time it is opened for writing. Filled in below.
MIGRATIONS: dict[int, Callable[[bytes], bytes]] = {}

#: Positioned read of a journal: ``read(offset, length)``, shorter only where the file ends.
Read = Callable[[int, int], bytes]


# --- the on-disk format (pure functions; the parsing ones run in a worker thread) ------------


class Damaged(Exception):
    """The journal cannot be read: why, and whether a newer version wrote it."""

    def __init__(self, reason: str, *, newer_version: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.newer_version = newer_version


@dataclass(slots=True)
class Parsed:
    client_id: str
    created_at: float
    #: None when the operations were not decoded (metadata-only parse).
    index: Index | None
    last_access: float | None
    ttl: float | None
    #: Offset just past the last valid record: where the file should end.
    good_end: int
    #: Size of what was parsed (the file, or the migrated bytes).
    size: int
    #: Bytes after ``good_end`` are a torn final record (or records a crash left torn).
    torn: bool
    #: The file was in an older format: the migrated bytes, which ``index`` describes.
    migrated: bytes | None
    #: Bytes after ``good_end`` are all zeros: preallocated, never written (not torn).
    zero_tail: bool = False


def encode_header(client_id: str, created_at: float) -> bytes:
    client_id_bytes = client_id.encode("utf-8", "surrogatepass")
    return _header(FORMAT_VERSION, created_at, client_id_bytes)


def _header(version: int, created_at: float, client_id: bytes) -> bytes:
    head = HEADER.pack(MAGIC, version, 0, created_at, len(client_id)) + client_id
    return head + U32.pack(zlib.crc32(head))


def record_header(body: bytes | bytearray) -> bytes:
    if len(body) > _MAX_BODY:
        raise StoreError(f"a batch of {len(body)} bytes does not fit in one journal record")
    length = U32.pack(len(body))
    return RECORD.pack(_RECORD_MARK, len(body), zlib.crc32(body, zlib.crc32(length)))


def encode_record(body: bytes) -> bytes:
    return record_header(body) + body


def encode_body(
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
    body_start = offset + RECORD.size
    if body_start > len(data):
        return None
    mark, length, crc = RECORD.unpack_from(data, offset)
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


#: Disk sectors: a write lost by a crash loses whole ones (page-cache pages are 8 of them).
_SECTOR = 512
#: The fewest zero bytes that count as a lost piece of a sector: records hold zero bytes of
#: their own (flags, the high bytes of numbers), but not 32 in a row ending on a sector edge.
_LOST_MIN = 32


def _lost_sector(damaged: bytes, offset: int) -> bool:
    """Whether ``damaged`` (the file's bytes from ``offset``) holds what a lost write leaves:
    its part in some sector is all zeros, at least ``_LOST_MIN`` bytes, and starts or ends on
    the sector's edge (stale preallocated zeros of a page that never reached the disk)."""
    end = offset + len(damaged)
    sector = offset - offset % _SECTOR
    while sector < end:
        start, stop = max(sector, offset), min(sector + _SECTOR, end)
        on_edge = start == sector or stop == sector + _SECTOR
        piece = damaged[start - offset : stop - offset]
        if on_edge and len(piece) >= _LOST_MIN and not piece.strip(b"\0"):
            return True
        sector += _SECTOR
    return False


def _migrate_journal_1_to_2(data: bytes) -> bytes:
    """Version 1 -> 2: the header's version, and ``ProtocolVersionSet(4)`` right after it."""
    if len(data) < HEADER.size:
        raise Damaged("file too short for a journal header")
    _, _, flags, created_at, id_length = HEADER.unpack_from(data, 0)
    id_end = HEADER.size + id_length
    if flags or id_end + U32.size > len(data):
        raise Damaged("journal header truncated or with unknown flags")
    if zlib.crc32(data[:id_end]) != U32.unpack_from(data, id_end)[0]:
        # Checked here: the new header gets a checksum of its own, which must not hide damage.
        raise Damaged("journal header checksum mismatch")
    # Version 1 spoke MQTT 3.1.1 (protocol level 4) only.
    spoken = encode_record(PLAIN_BODY + encode_operation(ProtocolVersionSet(4)))
    return _header(2, created_at, data[HEADER.size : id_end]) + spoken + data[id_end + U32.size :]


MIGRATIONS[1] = _migrate_journal_1_to_2


def _migrate(data: bytes, version: int) -> bytes:
    while version < FORMAT_VERSION:
        migration = MIGRATIONS.get(version)
        if migration is None:
            raise Damaged(f"format version {version} is not one this library ever wrote")
        data = migration(data)
        if len(data) < _PREAMBLE.size or data[:4] != MAGIC:
            raise Damaged(f"migration from format version {version} produced no journal")
        new_version = _PREAMBLE.unpack_from(data, 0)[1]
        if new_version <= version:
            raise Damaged(f"migration from format version {version} did not advance it")
        version = new_version
    return data


def pread(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``: fewer only where the file ends."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def reader(fd: int | None, size: int, extra: bytes = b"") -> Read:
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
            return pread(fd, length, offset)
        return pread(fd, size - offset, offset) + extra[: offset + length - size]

    return read


def parse_journal(read: Read, size: int, *, decode: bool = True) -> Parsed:
    """Replay a journal of ``size`` bytes through ``read``, in a window moving record by record.

    Raises :class:`Damaged` for anything but a torn tail. With ``decode`` the result's index
    describes the session; without it only the metadata and the extent are checked.
    """
    preamble = read(0, _PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        raise Damaged("file too short for a journal header")
    magic, version = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise Damaged(f"bad magic {magic!r}: not a session journal")
    if version > FORMAT_VERSION:
        raise Damaged(
            f"journal format version {version} is newer than this library's {FORMAT_VERSION}",
            newer_version=True,
        )
    migrated: bytes | None = None
    if version < FORMAT_VERSION:
        # Migrations transform whole files: the one time a journal is held in memory at once.
        migrated = _migrate(read(0, size), version)
        read, size = reader(None, 0, migrated), len(migrated)
    head = read(0, HEADER.size)
    if len(head) < HEADER.size:
        raise Damaged("file too short for a journal header")
    magic, version, flags, created_at, id_length = HEADER.unpack(head)
    if flags:
        raise Damaged(f"unknown header flags 0x{flags:04x}")
    id_end = HEADER.size + id_length
    if id_end + U32.size > size:
        raise Damaged("journal header truncated")
    head = read(0, id_end + U32.size)
    if len(head) < id_end + U32.size:
        raise Damaged("journal header truncated")
    if zlib.crc32(head[:id_end]) != U32.unpack_from(head, id_end)[0]:
        raise Damaged("journal header checksum mismatch")
    try:
        client_id = head[HEADER.size : id_end].decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise Damaged("client id in the header is not UTF-8") from exc

    index = Index(client_id) if decode else None
    last_access: float | None = None
    ttl: float | None = None
    offset = id_end + U32.size
    # ``buf`` holds the file's bytes from ``buf_start``: a window that moves record by record.
    buf = b""
    buf_start = offset
    while offset < size:
        valid = False
        if offset + RECORD.size <= size:
            if offset + RECORD.size > buf_start + len(buf):
                wanted = min(max(sizes.SCAN_CHUNK, RECORD.size), size - offset)
                buf = b""  # let the old window go before the new one is read
                buf, buf_start = read(offset, wanted), offset
            if offset + RECORD.size <= buf_start + len(buf):
                mark, length, crc = RECORD.unpack_from(buf, offset - buf_start)
                end = offset + RECORD.size + length
                if mark == _RECORD_MARK and length and end <= size:
                    if end > buf_start + len(buf):
                        wanted = max(end - offset, min(sizes.SCAN_CHUNK, size - offset))
                        buf = b""
                        buf, buf_start = read(offset, wanted), offset
                    p = offset - buf_start
                    if end <= buf_start + len(buf):
                        length_crc = zlib.crc32(buf[p + 1 : p + 5])
                        with memoryview(buf) as view:  # no copy of the body
                            body = view[p + RECORD.size : end - buf_start]
                            valid = zlib.crc32(body, length_crc) == crc
                            body.release()
        if not valid:
            tail = read(offset, size - offset)
            if not tail.strip(b"\0"):
                # The preallocated zeros after the last record: free space, not damage.
                return Parsed(
                    client_id, created_at, index, last_access, ttl, offset, size, False, migrated,
                    zero_tail=True,
                )  # fmt: skip
            # Damage; a torn tail only if no valid record follows, or if the damaged bytes
            # show a page lost by a crash (see the module docstring).
            later = _valid_record_after(tail, 0)
            if later is not None and not _lost_sector(tail[:later], offset):
                raise Damaged(
                    f"damaged record at offset {offset} followed by a valid one at {offset + later}"
                )
            return Parsed(
                client_id, created_at, index, last_access, ttl, offset, size, True, migrated
            )
        # The body is buf[position:stop]; nothing is copied out of the window.
        position = offset - buf_start + RECORD.size
        stop = end - buf_start
        body_flags = buf[position]
        if body_flags & ~_BODY_KNOWN:
            raise Damaged(f"record at offset {offset} has unknown flags 0x{body_flags:02x}")
        position += 1
        metadata_end = position + _F64.size * (
            bool(body_flags & _BODY_ACCESS) + bool(body_flags & _BODY_TTL)
        )
        if metadata_end > stop:
            raise Damaged(f"record at offset {offset} is too short for its metadata")
        if body_flags & _BODY_ACCESS:
            last_access = _F64.unpack_from(buf, position)[0]
            position += _F64.size
        if body_flags & _BODY_TTL:
            ttl = _F64.unpack_from(buf, position)[0] or None
        if index is not None and metadata_end < stop:
            try:
                _replay_ops(index, buf, metadata_end, stop, buf_start)
            except DecodeError as exc:
                raise Damaged(f"record at offset {offset}: {exc}") from exc
        offset = end
    return Parsed(client_id, created_at, index, last_access, ttl, size, size, False, migrated)


def _replay_ops(index: Index, buf: bytes, at: int, end: int, base: int) -> None:
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
        if flags & ~_MSG_KNOWN_FLAGS or flags & _MSG_QOS_MASK == 3:
            raise DecodeError(f"invalid message flags 0x{flags:02x} at offset {at - first}")
        if packet_id and not flags & _MSG_HAS_PACKET_ID:
            raise DecodeError(f"packet id without its flag at offset {at - first}")
        topic_at = at + header_size
        if flags & _MSG_EXTRAS:  # expiry, properties: checked, left in the file like the payload
            topic_at = message_layout(buf, at, flags, end)[0]
        next_at = topic_at + topic_length + payload_length
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


def parse_fd(fd: int, decode: bool) -> Parsed:
    size = os.fstat(fd).st_size
    return parse_journal(reader(fd, size), size, decode=decode)


def read_and_parse(path: str, decode: bool) -> Parsed | Damaged | None:
    """Lock-free read-only parse for listing: None if the file vanished."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return parse_fd(fd, decode)
    except Damaged as damaged:
        return damaged
    finally:
        os.close(fd)


def recorded_access(parsed: Parsed) -> float:
    return parsed.last_access if parsed.last_access is not None else parsed.created_at
