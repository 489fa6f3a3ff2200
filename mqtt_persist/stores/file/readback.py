"""Messages read back from a FileStore journal: the payloads the index points at.

The index knows where each message's ``MessageAdded`` operation lies; these functions read
those bytes with positioned reads (neighbours share one read of up to ``sizes.READ_SPAN``
bytes) and build the messages, checking that the bytes are the operation the index expects.
They run on the store's worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mqtt_persist.errors import StoreError
from mqtt_persist.session.state import StoredMessage
from mqtt_persist.stores.file import sizes
from mqtt_persist.stores.file.index import Entry
from mqtt_persist.stores.file.journal import Read, reader

# The MessageAdded layout (part of the on-disk format, documented in serialization's
# docstring), read in place: a page of the queue is built without decoding operation objects.
from mqtt_persist.stores.serialization import (
    _MSG,
    _MSG_EXTRAS,
    _MSG_QOS_MASK,
    _MSG_RETAIN,
    _T_MESSAGE_ADDED,
    DecodeError,
    message_layout,
)

__all__ = ["messages_in", "not_there", "read_exactly", "read_messages", "stored_header"]


def _groups(read: Read, entries: Iterable[Entry]) -> Iterator[tuple[list[Entry], bytes, int]]:
    """Entries in groups that one positioned read serves: (group, buffer, its file offset).

    Entries close together in the journal share a read of up to :data:`sizes.READ_SPAN` bytes, so
    paging through a queue (written in order) costs a few large reads, not one per message.
    """
    group: list[Entry] = []
    start = end = 0
    for entry in entries:
        offset = entry[1]
        entry_end = offset + entry[2]
        if (
            group
            and start <= offset <= end + sizes.READ_GAP
            and entry_end - start <= sizes.READ_SPAN
        ):
            group.append(entry)
            if entry_end > end:
                end = entry_end
            continue
        if group:
            yield group, read_exactly(read, start, end), start
        group = [entry]
        start, end = offset, entry_end
    if group:
        yield group, read_exactly(read, start, end), start


def read_exactly(read: Read, start: int, end: int) -> bytes:
    buf = read(start, end - start)
    if len(buf) < end - start:
        raise StoreError(
            f"the journal ends before offset {end}, where its index expects a message: "
            "was it changed behind the store's back?"
        )
    return buf


#: What :func:`stored_header` reads: flags, the stored packet ID field, where the topic starts
#: in the buffer, the topic's length, expires_at, and the length of the properties (which end
#: where the topic starts).
Header = tuple[int, int, int, int, float | None, int]


def stored_header(buf: bytes, at: int, entry: Entry) -> Header:
    """The fixed and optional fields of the ``MessageAdded`` at ``buf[at:]`` (see :data:`Header`).

    Raises :func:`not_there` unless those bytes are the operation ``entry`` expects: a
    ``MessageAdded`` of its sequence number and exactly its length.
    """
    seq, _, length, _, _ = entry
    if length < _MSG.size:
        raise not_there(entry)
    kind, stored_seq, flags, packet_id, topic_length, payload_length = _MSG.unpack_from(buf, at)
    if kind != _T_MESSAGE_ADDED or stored_seq != seq:
        raise not_there(entry)
    topic_at = at + _MSG.size
    expires_at: float | None = None
    properties_length = 0
    if flags & _MSG_EXTRAS:
        try:
            topic_at, expires_at, properties_length = message_layout(buf, at, flags, at + length)
        except DecodeError as exc:  # checked when the journal was opened
            raise not_there(entry) from exc
    if topic_at - at + topic_length + payload_length != length:
        raise not_there(entry)
    return flags, packet_id, topic_at, topic_length, expires_at, properties_length


def not_there(entry: Entry) -> StoreError:
    return StoreError(
        f"the journal holds no message {entry[0]} at offset {entry[1]}, where its index expects "
        "it: was it changed behind the store's back?"
    )


def read_messages(fd: int, size: int, entries: list[Entry]) -> list[StoredMessage]:
    """The messages of ``entries``, in their order, read back from the journal ``fd``."""
    messages: list[StoredMessage] = []
    for group, buf, start in _groups(reader(fd, size), entries):
        messages += messages_in(group, buf, start)
    return messages


def messages_in(group: list[Entry], buf: bytes, start: int) -> list[StoredMessage]:
    """The messages of ``group``, built from ``buf`` (the journal from offset ``start``).

    Each is built straight from its ``MessageAdded`` bytes after checking that they are the
    operation the index expects (type, sequence number, length); packet ID and released come
    from the index, as later operations may have changed them.
    """
    messages: list[StoredMessage] = []
    append = messages.append
    for entry in group:
        seq, offset, length, packet_id, released = entry
        at = offset - start
        flags, _, topic_at, topic_length, expires_at, properties_length = stored_header(
            buf, at, entry
        )
        payload_at = topic_at + topic_length
        try:
            topic = buf[topic_at:payload_at].decode()
        except UnicodeDecodeError as exc:  # checked when the journal was opened
            raise not_there(entry) from exc
        append(
            StoredMessage(
                seq,
                topic,
                buf[payload_at : at + length],
                flags & _MSG_QOS_MASK,
                bool(flags & _MSG_RETAIN),
                packet_id,
                released,
                buf[topic_at - properties_length : topic_at] if properties_length else b"",
                expires_at,
            )
        )
    return messages
