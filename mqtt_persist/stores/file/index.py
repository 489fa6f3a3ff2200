"""FileStore's in-memory index of an open session, and what each operation does to it.

:data:`RULES` is the one place that says what each journal operation type does to a
FileStore session: operations about messages change the index (where each message's
``MessageAdded`` lies in the journal, plus its packet ID and released flag; where each
set-aside message's lies, plus why and when it was set aside), the others are
replayed onto ``Index.meta`` by :meth:`SessionState.apply
<mqtt_persist.session.state.SessionState.apply>` itself. The module refuses to import if an
operation type has no rule, and the conformance tests compare the index's view with
``SessionState.apply`` after random operation sequences.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mqtt_persist.session.state import (
    InboundCleared,
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SessionState,
    SetAsideMessage,
    SetAsideRemoved,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
)
from mqtt_persist.stores._checks import check_handlers
from mqtt_persist.stores.file import sizes

__all__ = ["LENGTH_CODE", "RULES", "Entry", "Index"]

#: A stored message as the index knows it: sequence number, offset and length of its
#: ``MessageAdded`` operation in the journal, packet ID (None while queued), released.
Entry = tuple[int, int, int, int | None, bool]

# Array type codes: "q" is 8 bytes; lengths need 4 (an operation lies inside a record body,
# whose length is a uint32), which "I" is on every platform CPython supports.
LENGTH_CODE = "I" if array("I").itemsize >= 4 else "L"


class Index:
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
    :data:`~.sizes.INDEX_SLACK` and half the live ones. So a queued message costs at most 30 bytes
    (plus the arrays' growth reserve and a constant), and every operation stays O(log n)
    amortised, except inserting below the highest queued number (a requeue, or a message added
    out of order), which shifts the arrays behind it.

    Set-aside messages (few: the poison messages nobody discarded yet) are a dict by sequence
    number of where their ``MessageAdded`` lies, why and when; ``meta.set_aside`` stays empty.

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
        "set_aside",
    )

    def __init__(self, client_id: str) -> None:
        self.meta = SessionState(client_id)
        #: Highest sequence number ever added (0: none), by SessionState.last_seq's rule.
        self.last_seq = 0
        #: seq -> (offset, length, packet ID, released) of messages in the in-flight window.
        self.inflight: dict[int, tuple[int, int, int, bool]] = {}
        self.q_seq = array("q")
        self.q_off = array("q")
        self.q_len = array(LENGTH_CODE)
        self.q_head = 0
        self.q_live = 0
        self.q_dead = 0
        #: Queued messages flagged released (MessageReleased before a packet ID: odd, but a
        #: replay keeps it, so the index does too).
        self.q_released: set[int] = set()
        #: seq -> (offset, length, reason, at) of set-aside messages.
        self.set_aside: dict[int, tuple[int, int, str, float]] = {}

    def live_bytes(self) -> int:
        """Bytes of the operations that still describe a live message (what a rewrite keeps)."""
        q_off, q_len = self.q_off, self.q_len
        queued = sum(q_len[i] for i in range(self.q_head, len(q_off)) if q_off[i] >= 0)
        aside = sum(entry[1] for entry in self.set_aside.values())
        return queued + aside + sum(entry[1] for entry in self.inflight.values())

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
        if not self.q_live or (self.q_dead > sizes.INDEX_SLACK and self.q_dead > self.q_live >> 1):
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
            self.q_len = array(LENGTH_CODE, [q_len[i] for i in keep])
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
        RULES[type(op)](self, op, offset, length)

    # --- the rule of each operation type (see RULES) ---------------------------------------

    def _message_added(self, op: MessageAdded, offset: int, length: int) -> None:
        m = op.message
        self.add(m.seq, offset, length, m.packet_id, m.released)

    def _packet_id_assigned(self, op: PacketIdAssigned, offset: int, length: int) -> None:
        seq = op.seq
        if (entry := self.inflight.get(seq)) is not None:
            self.inflight[seq] = (entry[0], entry[1], op.packet_id, entry[3])
        elif (i := self._find(seq)) >= 0:
            released = seq in self.q_released
            self.inflight[seq] = (self.q_off[i], self.q_len[i], op.packet_id, released)
            self._remove_queued(i)

    def _message_released(self, op: MessageReleased, offset: int, length: int) -> None:
        if (entry := self.inflight.get(op.seq)) is not None:
            self.inflight[op.seq] = (entry[0], entry[1], entry[2], True)
        elif self._find(op.seq) >= 0:
            self.q_released.add(op.seq)

    def _message_requeued(self, op: MessageRequeued, offset: int, length: int) -> None:
        if (entry := self.inflight.pop(op.seq, None)) is not None:
            self._add_queued(op.seq, entry[0], entry[1])  # no packet ID, not released
        else:
            self.q_released.discard(op.seq)

    def _message_removed(self, op: MessageRemoved, offset: int, length: int) -> None:
        if self.inflight.pop(op.seq, None) is None and (i := self._find(op.seq)) >= 0:
            self._remove_queued(i)

    def _message_set_aside(self, op: MessageSetAside, offset: int, length: int) -> None:
        # The message's MessageAdded stays where it is; readback clears packet ID and released.
        seq = op.seq
        if (entry := self.inflight.pop(seq, None)) is not None:
            self.set_aside[seq] = (entry[0], entry[1], op.reason, op.at)
        elif (i := self._find(seq)) >= 0:
            self.set_aside[seq] = (self.q_off[i], self.q_len[i], op.reason, op.at)
            self._remove_queued(i)

    def _set_aside_removed(self, op: SetAsideRemoved, offset: int, length: int) -> None:
        self.set_aside.pop(op.seq, None)

    def _not_about_messages(self, op: Operation, offset: int, length: int) -> None:
        # Inbound IDs, subscriptions, the protocol level: SessionState.apply itself is the rule.
        self.meta.apply(op)

    def apply_batch(self, ops: Sequence[Operation], encoded: Sequence[bytes], offset: int) -> None:
        """Replay a batch whose encoded operations lie back to back from ``offset``."""
        for op, data in zip(ops, encoded, strict=True):
            self.apply(op, offset, len(data))
            offset += len(data)

    # --- queries ---------------------------------------------------------------------------

    def queued_after(self, after_seq: int | None, limit: int | None) -> list[Entry]:
        """Queued entries with ``seq > after_seq`` (None: all), ascending, at most ``limit``."""
        q_seq, q_off, q_len, released = self.q_seq, self.q_off, self.q_len, self.q_released
        i = self.q_head if after_seq is None else bisect_right(q_seq, after_seq, self.q_head)
        want = self.q_live if limit is None else limit
        end = len(q_seq)
        entries: list[Entry] = []
        while i < end and len(entries) < want:
            offset = q_off[i]
            if offset >= 0:
                seq = q_seq[i]
                entries.append((seq, offset, q_len[i], None, seq in released))
            i += 1
        return entries

    def inflight_entries(self) -> list[Entry]:
        """In-flight entries, ascending."""
        return sorted(
            (seq, offset, length, packet_id, released)
            for seq, (offset, length, packet_id, released) in self.inflight.items()
        )

    def entries(self) -> Iterator[Entry]:
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

    def set_aside_entries(self) -> list[Entry]:
        """Set-aside messages' entries, ascending (no packet ID, not released)."""
        return [
            (seq, offset, length, None, False)
            for seq, (offset, length, _, _) in sorted(self.set_aside.items())
        ]

    def to_state(
        self, messages: list[StoredMessage], queued_loaded: int, set_aside: list[StoredMessage]
    ) -> SessionState:
        """The session with these messages and these set-aside messages (read back for
        ``load``), as a new SessionState."""
        meta = self.meta
        aside = self.set_aside
        return SessionState(
            meta.client_id,
            {m.seq: m for m in messages},
            set(meta.inbound_qos2),
            dict(meta.subscriptions),
            set(meta.pending_unsubscribes),
            last_seq=self.last_seq,
            queued_not_loaded=self.q_live - queued_loaded,
            set_aside={
                m.seq: SetAsideMessage(m, aside[m.seq][2], aside[m.seq][3]) for m in set_aside
            },
            protocol_version=meta.protocol_version,
        )


#: What each operation type does to an :class:`Index`: ``rule(index, op, offset, length)``.
RULES: dict[type, Callable[[Index, Any, int, int], None]] = {
    MessageAdded: Index._message_added,
    PacketIdAssigned: Index._packet_id_assigned,
    MessageReleased: Index._message_released,
    MessageRequeued: Index._message_requeued,
    MessageRemoved: Index._message_removed,
    InboundReceived: Index._not_about_messages,
    InboundReleased: Index._not_about_messages,
    InboundCleared: Index._not_about_messages,
    SubscriptionSet: Index._not_about_messages,
    SubscriptionRemoved: Index._not_about_messages,
    UnsubscribeDone: Index._not_about_messages,
    ProtocolVersionSet: Index._not_about_messages,
    MessageSetAside: Index._message_set_aside,
    SetAsideRemoved: Index._set_aside_removed,
}
check_handlers("FileStore", RULES)
