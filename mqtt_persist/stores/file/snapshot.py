"""Rewriting a FileStore journal: a whole new file holding exactly the live session.

Creating a journal, compacting it, ``save`` and a migration all write a snapshot: the header,
then the set-aside messages (each ``MessageAdded`` + ``MessageSetAside``), the messages as
``MessageAdded`` operations in ascending sequence order, and the rest (inbound IDs,
subscriptions, pending unsubscribes, the protocol level), cut into records of about
``sizes.SNAPSHOT_CHUNK`` bytes. Compaction streams the messages from the old file into the new
one (:func:`index_source`), so a session is never held in memory whole. These functions run on
the store's worker thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator

from mqtt_persist.session.state import (
    MessageAdded,
    MessageRemoved,
    MessageSetAside,
    SessionState,
    StoredMessage,
    with_flow,
)
from mqtt_persist.stores._files import fsync_fd
from mqtt_persist.stores.file import sizes
from mqtt_persist.stores.file.index import Entry, Index
from mqtt_persist.stores.file.journal import (
    PLAIN_BODY,
    RECORD,
    Read,
    encode_body,
    encode_header,
    record_header,
)
from mqtt_persist.stores.file.readback import messages_in, read_exactly, stored_header

# The MessageAdded layout, read in place (see readback).
from mqtt_persist.stores.serialization import (
    _MSG_HAS_PACKET_ID,
    _MSG_RELEASED,
    encode_operation,
    encode_operations,
)

__all__ = [
    "Placed",
    "index_source",
    "meta_of",
    "state_source",
    "write_all",
    "write_snapshot",
]

#: A message as a rewrite writes it: sequence number, packet ID, released, its
#: ``MessageAdded`` operation encoded with exactly that packet ID and released flag, and for a
#: set-aside message why and when it was set aside (None: a message in the flow). Set-aside
#: messages come first, then the others in ascending order.
Placed = tuple[int, int | None, bool, bytes, tuple[str, float] | None]


def meta_of(state: SessionState) -> SessionState:
    """What a rewrite takes from ``state`` besides its messages and set-aside messages.

    It shares ``state``'s sets and dicts (:func:`write_snapshot` copies what it keeps).
    """
    return dataclasses.replace(state, messages={}, set_aside={})


def index_source(read: Read, size: int, index: Index) -> Iterator[Placed]:
    """An index's messages for a rewrite, streamed from the ``size`` bytes ``read`` gives.

    The journal is read in windows of :data:`sizes.READ_SPAN` bytes from the next message wanted,
    so it passes through once, front to back (after the few set-aside messages). A message
    whose stored operation still says what the index says (the usual queued one: no packet ID,
    not released) is copied byte for byte after the same check as :func:`messages_in`; the
    others are re-encoded.
    """
    buf = b""
    start = 0
    window_end = 0
    aside = index.set_aside
    set_aside: Iterator[tuple[Entry, tuple[str, float] | None]] = (
        (entry, aside[entry[0]][2:]) for entry in index.set_aside_entries()
    )
    flow: Iterator[tuple[Entry, tuple[str, float] | None]] = (
        (entry, None) for entry in index.entries()
    )
    for entry, why in itertools.chain(set_aside, flow):
        seq, offset, length, packet_id, released = entry
        if offset < start or offset + length > window_end:
            buf = b""  # let the old window go before the new one is read
            window = max(length, min(sizes.READ_SPAN, size - offset))
            buf = read_exactly(read, offset, offset + window)
            start, window_end = offset, offset + window
        at = offset - start
        flags, stored_packet_id = stored_header(buf, at, entry)[:2]
        stored = stored_packet_id if flags & _MSG_HAS_PACKET_ID else None
        if stored == packet_id and bool(flags & _MSG_RELEASED) == released:
            op = buf[at : at + length]
        else:
            [message] = messages_in([entry], buf, start)
            op = encode_operation(MessageAdded(message))
        yield seq, packet_id, released, op, why


def state_source(state: SessionState) -> Iterator[Placed]:
    """A snapshot's set-aside messages, then its messages in ascending sequence order (``save``)."""
    for a in sorted(state.set_aside.values(), key=lambda a: a.message.seq):
        m = with_flow(a.message)
        yield m.seq, None, False, encode_operation(MessageAdded(m)), (a.reason, a.at)
    for m in sorted(state.messages.values(), key=lambda m: m.seq):
        yield m.seq, m.packet_id, m.released, encode_operation(MessageAdded(m)), None


def write_snapshot(
    fd: int,
    client_id: str,
    created_at: float,
    now: float,
    ttl: float | None,
    messages: Iterator[Placed],
    meta: SessionState,
    last_seq: int,
    sync: bool,
) -> tuple[Index, int]:
    """Write a whole journal to ``fd`` (a new, empty file) and fsync it: one worker-thread hop.

    ``messages`` (see :data:`Placed`) and ``meta`` (the rest of the session) are cut into records of
    about :data:`sizes.SNAPSHOT_CHUNK` bytes; the first record carries last access and TTL. The
    index of the new file is built as the operations are placed. Returns it and the size.
    """
    index = Index(client_id)
    index.meta = meta.copy()
    header = encode_header(client_id, created_at)
    write_all(fd, header, False)
    position = len(header)  # where the record being filled will start
    body = bytearray(encode_body(b"", last_access=now, ttl=ttl if ttl is not None else 0.0))
    empty = used = len(body)

    def flush() -> None:
        nonlocal position, body, empty, used
        write_all(fd, record_header(body), False)
        write_all(fd, body, False)
        position += RECORD.size + len(body)
        body = bytearray(PLAIN_BODY)
        empty = used = len(body)

    add = index.add
    # Queued messages arrive in ascending order: append them to the index directly.
    append_seq, append_off, append_len = index.q_seq.append, index.q_off.append, index.q_len.append
    queued = 0
    # The highest sequence number in the flow so far (for the appends above), and of all.
    highest: int | None = None
    top = 0
    for seq, packet_id, released, op, aside in messages:
        if aside is not None:
            # Added, then set aside at once: the replay leaves it in set_aside only.
            step = op + encode_operation(MessageSetAside(seq, *aside))
            if used > empty and used + len(step) > sizes.SNAPSHOT_CHUNK:
                flush()
            index.set_aside[seq] = (position + RECORD.size + used, len(op), *aside)
            body += step
            used += len(step)
            top = max(top, seq)
            continue
        length = len(op)
        if used > empty and used + length > sizes.SNAPSHOT_CHUNK:
            flush()
        offset = position + RECORD.size + used
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
    top = max(top, highest or 0)
    if last_seq > 0 and last_seq > top:
        # Messages above every remaining one were removed: keep their highest number in the
        # replay (SessionState.last_seq), so sequence numbers never go backwards.
        tail += [MessageAdded(StoredMessage(last_seq, "", b"", 1)), MessageRemoved(last_seq)]
    body += encode_operations(tail)
    flush()
    index.last_seq = max(index.last_seq, last_seq, top)
    if sync:
        fsync_fd(fd)
    return index, position


def write_all(fd: int, data: bytes | bytearray, sync: bool) -> None:
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
        fsync_fd(fd)
